// CUDA jem_dispatch. Flags [N, T] (token t has an entry on live rank r) are scanned in one device-wide
// exclusive scan; a rank's positions are the scan minus its value at the rank's first token, so the
// rows keep ascending token order. Then one block per output row copies its token's row with the
// widest vector access the row allows (16 bytes for bf16/f32 rows of DeepSeek-V3's H), or clears it.
#include "../dispatch.h"
#include "cuda_util.cuh"

namespace jem {
namespace {

__global__ void DispatchFlags(const int32_t* slots, const int32_t* active, int64_t t_n, int64_t k_n, int64_t n_n,
                              int64_t s_n, int32_t* flags) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_n * t_n) return;
  const int64_t r = i / t_n, t = i % t_n;
  int32_t f = 0;
  if (active[r] > 0) {
    for (int64_t k = 0; k < k_n; ++k) {
      const int32_t s = slots[t * k_n + k];
      f |= (s >= 0 && s / s_n == r);
    }
  }
  flags[i] = f;
}

__global__ void DispatchTokens(const int32_t* flags, const int32_t* excl, int64_t t_n, int64_t n_n,
                               int32_t* src_token, int32_t* counts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_n * t_n) return;
  const int64_t r = i / t_n, t = i % t_n, first = r * t_n;
  if (flags[i]) src_token[first + excl[i] - excl[first]] = static_cast<int32_t>(t);
  if (t == 0) counts[r] = excl[first + t_n] - excl[first];
}

template <typename V>
__global__ void DispatchRows(const V* x, const int32_t* slots, const uint8_t* w, int w_bytes,
                             const int32_t* src_token, int64_t t_n, int64_t k_n, int64_t s_n, int64_t vecs,
                             V* send_x, int32_t* send_slot, uint8_t* send_w) {
  const int64_t row = blockIdx.x, r = row / t_n;
  const int32_t t = src_token[row];
  CopyRow(send_x + row * vecs, t >= 0 ? x + t * vecs : nullptr, vecs);
  for (int64_t k = threadIdx.x; k < k_n; k += blockDim.x) {
    const int32_t s = t >= 0 ? slots[t * k_n + k] : -1;
    const bool here = s >= 0 && s / s_n == r;
    send_slot[row * k_n + k] = here ? static_cast<int32_t>(s % s_n) : -1;
    for (int b = 0; b < w_bytes; ++b)
      send_w[(row * k_n + k) * w_bytes + b] = here ? w[(t * k_n + k) * w_bytes + b] : 0;
  }
}

ffi::Error DispatchCudaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer slots, ffi::AnyBuffer weights,
                            ffi::AnyBuffer active, ffi::Result<ffi::AnyBuffer> send_x,
                            ffi::Result<ffi::AnyBuffer> send_slot, ffi::Result<ffi::AnyBuffer> send_w,
                            ffi::Result<ffi::AnyBuffer> counts, ffi::Result<ffi::AnyBuffer> src_token,
                            ffi::Result<ffi::AnyBuffer> scratch, int64_t slots_per_rank) {
  const char* op = "jem_dispatch";
  DispatchDims d;
  JEM_RETURN_IF_ERROR(CheckDispatch(x, slots, weights, active, *send_x, *send_slot, *send_w, *counts, *src_token,
                                    *scratch, slots_per_rank, &d));
  const int64_t cells = d.ranks * d.tokens;
  if (d.ranks == 0) return ffi::Error::Success();
  int32_t* cnt = static_cast<int32_t*>(counts->untyped_data());
  int32_t* src = static_cast<int32_t*>(src_token->untyped_data());
  JEM_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(cnt, 0, d.ranks * sizeof(int32_t), stream), op, "clear counts"));
  if (cells == 0) return ffi::Error::Success();
  JEM_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(src, 0xff, cells * sizeof(int32_t), stream), op, "clear src_token"));

  int32_t* flags = static_cast<int32_t*>(scratch->untyped_data());
  int32_t* excl = flags + cells;
  const int32_t* slot = static_cast<const int32_t*>(slots.untyped_data());
  DispatchFlags<<<Blocks(cells, 256), 256, 0, stream>>>(slot, static_cast<const int32_t*>(active.untyped_data()),
                                                         d.tokens, d.topk, d.ranks, d.slots_per_rank, flags);
  JEM_RETURN_IF_ERROR(LaunchStatus(op, "DispatchFlags"));
  JEM_RETURN_IF_ERROR(ExclusiveScan(flags, excl, cells, excl + cells + 1, stream, op));
  DispatchTokens<<<Blocks(cells, 256), 256, 0, stream>>>(flags, excl, d.tokens, d.ranks, src, cnt);
  JEM_RETURN_IF_ERROR(LaunchStatus(op, "DispatchTokens"));

  const int vb = VectorBytes(d.row_bytes, x.untyped_data(), send_x->untyped_data());
  const int64_t vecs = d.row_bytes / vb;
  WithVector(vb, [&](auto v) {
    using V = decltype(v);
    DispatchRows<V><<<static_cast<unsigned>(cells), RowThreads(vecs), 0, stream>>>(
        static_cast<const V*>(x.untyped_data()), slot, static_cast<const uint8_t*>(weights.untyped_data()),
        static_cast<int>(d.w_bytes), src, d.tokens, d.topk, d.slots_per_rank, vecs,
        static_cast<V*>(send_x->untyped_data()), static_cast<int32_t*>(send_slot->untyped_data()),
        static_cast<uint8_t*>(send_w->untyped_data()));
  });
  return LaunchStatus(op, "DispatchRows");
}

}  // namespace
}  // namespace jem

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemDispatchCuda, jem::DispatchCudaImpl,
                              JEM_CUDA_BIND
                                  JEM_ARG JEM_ARG JEM_ARG JEM_ARG
                                  JEM_RET JEM_RET JEM_RET JEM_RET JEM_RET JEM_RET
                                  .Attr<int64_t>("slots_per_rank"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
