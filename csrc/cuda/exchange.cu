// CUDA jem_exchange (csrc/exchange.h): the same exchange for operands in GPU memory, staged through
// pinned host memory. On the op's own stream: copy the operands to a pinned host mirror, synchronise
// that stream, run the host exchange (csrc/cpu/exchange.cc: pack into registered staging, Mooncake
// writes, signals, the wait against the op's deadline), then copy the results back and synchronise
// the stream again, so the mirror is free for the next op. Only the op's own stream is synchronised.
//
// Not command-buffer compatible (registered without kCmdBufferCompatible): it waits on the host for
// other processes and calls Mooncake, neither of which a CUDA graph can replay.
// GPUDirect RDMA (rows written from registered GPU memory) is not done: it needs Mooncake's CUDA
// build with RDMA devices, and XLA's buffers would have to be registered or copied into a registered
// device region; the pinned-host path works with every transport.
#include <cuda_runtime.h>

#include <map>

#include "../cpu/exchange_state.h"
#include "cuda_util.cuh"

namespace jem {
namespace exchange {
namespace {

struct Mirror {
  char* host = nullptr;  // pinned
  size_t bytes = 0;
};
std::mutex mirrors_mu;
std::map<int64_t, Mirror> mirrors;  // context id -> its mirror (ops of one context hold its lock)

ffi::Error MirrorFor(int64_t ctx_id, size_t bytes, char** out) {
  std::lock_guard<std::mutex> lock(mirrors_mu);
  Mirror& m = mirrors[ctx_id];
  if (m.bytes < bytes) {
    if (m.host != nullptr) cudaFreeHost(m.host);
    m.host = nullptr;
    m.bytes = 0;
    JEM_RETURN_IF_ERROR(CudaStatus(cudaMallocHost(reinterpret_cast<void**>(&m.host), bytes), "jem_exchange", "cudaMallocHost"));
    m.bytes = bytes;
  }
  *out = m.host;
  return ffi::Error::Success();
}

int64_t Aligned(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

ffi::Error ExchangeCudaImpl(cudaStream_t stream, ffi::AnyBuffer send_counts, ffi::AnyBuffer active, ffi::AnyBuffer step,
                            ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> recv_counts, ffi::RemainingRets rets,
                            int64_t ctx_id, int64_t seq_stride, int64_t seq_offset, int64_t timeout_ns) {
  const char* op = "jem_exchange (CUDA)";
  int64_t n = 0, t = 0;
  std::vector<Array> arrays;
  JEM_RETURN_IF_ERROR(CheckArgs(send_counts, active, step, args, *recv_counts, rets, &n, &t, &arrays));
  auto ctx = Find(ctx_id);
  if (!ctx) return ffi::Error::InvalidArgument("jem_exchange: no exchange context " + std::to_string(ctx_id));
  std::lock_guard<std::mutex> lock(ctx->mu);
  // Mirror: counts [n] | active [n] | step | received [n], then per array its operand and its result.
  const int64_t small = Aligned(static_cast<int64_t>(sizeof(int32_t)) * (3 * n + 1));
  int64_t total = small;
  for (const Array& a : arrays) total += 2 * Aligned(n * t * a.row_bytes);
  char* host = nullptr;
  JEM_RETURN_IF_ERROR(MirrorFor(ctx_id, static_cast<size_t>(total), &host));
  int32_t* h_counts = reinterpret_cast<int32_t*>(host);
  int32_t* h_active = h_counts + n;
  int32_t* h_step = h_active + n;
  int32_t* h_received = h_step + 1;
  const size_t vec = sizeof(int32_t) * static_cast<size_t>(n);
  JEM_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(h_counts, send_counts.untyped_data(), vec, cudaMemcpyDeviceToHost, stream), op, "copy send_counts"));
  JEM_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(h_active, active.untyped_data(), vec, cudaMemcpyDeviceToHost, stream), op, "copy active"));
  JEM_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(h_step, step.untyped_data(), sizeof(int32_t), cudaMemcpyDeviceToHost, stream), op, "copy step"));
  std::vector<char*> device_results;
  char* cursor = host + small;
  for (Array& a : arrays) {
    const int64_t bytes = n * t * a.row_bytes;
    if (bytes > 0)
      JEM_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(cursor, a.send, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, stream), op, "copy rows"));
    a.send = cursor;
    device_results.push_back(a.recv);
    a.recv = cursor + Aligned(bytes);
    cursor += 2 * Aligned(bytes);
  }
  JEM_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), op, "synchronise before sending"));
  JEM_RETURN_IF_ERROR(Exchange(ctx.get(), h_counts, h_active, *h_step, arrays, h_received, n, t, seq_stride, seq_offset,
                               timeout_ns));
  JEM_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(recv_counts->untyped_data(), h_received, vec, cudaMemcpyHostToDevice, stream), op, "copy recv_counts"));
  for (size_t i = 0; i < arrays.size(); ++i) {
    const int64_t bytes = n * t * arrays[i].row_bytes;
    if (bytes > 0)
      JEM_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(device_results[i], arrays[i].recv, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream), op, "copy results"));
  }
  return CudaStatus(cudaStreamSynchronize(stream), op, "synchronise after receiving");
}

}  // namespace
}  // namespace exchange
}  // namespace jem

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemExchangeCuda, jem::exchange::ExchangeCudaImpl,
                              JEM_CUDA_BIND JEM_EXCHANGE_SIGNATURE);
