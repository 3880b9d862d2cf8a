// CUDA jem_regroup: a stable counting sort by local slot over tiles of kRegroupTile entries.
//   1. per tile, a slot histogram in shared memory, stored slot-major as cells [S, tiles];
//   2. one exclusive scan of the cells gives, for each (slot, tile), where that tile's entries of the
//      slot start in the output: slots in order, tiles (= entry order) in order within a slot;
//   3. per tile, each entry's rank among the tile's earlier entries of its slot (warp match + per-warp
//      counts) places it; 4. one block per output position copies its row, or clears padding.
#include "../regroup.h"
#include "cuda_util.cuh"

namespace jem {
namespace {

constexpr int kWarps = static_cast<int>(kRegroupTile) / 32;

__global__ void RegroupCount(const int32_t* slot, int64_t entries, int64_t s_n, int64_t tiles, int32_t* cells) {
  extern __shared__ int32_t hist[];  // [S]
  for (int64_t s = threadIdx.x; s < s_n; s += blockDim.x) hist[s] = 0;
  __syncthreads();
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kRegroupTile + threadIdx.x;
  if (e < entries) {
    const int32_t v = slot[e];
    if (v >= 0 && v < s_n) atomicAdd(&hist[v], 1);
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < s_n; s += blockDim.x) cells[s * tiles + blockIdx.x] = hist[s];
}

__global__ void RegroupSizes(const int32_t* excl, int64_t s_n, int64_t tiles, int32_t* sizes) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < s_n) sizes[s] = excl[(s + 1) * tiles] - excl[s * tiles];
}

__global__ void RegroupPlace(const int32_t* slot, const uint8_t* w, int w_bytes, int64_t entries, int64_t k_n,
                             int64_t s_n, int64_t tiles, int64_t m, const int32_t* excl, int32_t* entry_row,
                             uint8_t* entry_w) {
  extern __shared__ int32_t warp_counts[];  // [kWarps, S]: entries of each slot in each warp
  for (int64_t i = threadIdx.x; i < kWarps * s_n; i += blockDim.x) warp_counts[i] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kRegroupTile + threadIdx.x;
  const int32_t v = e < entries ? slot[e] : -1;
  const bool valid = v >= 0 && v < s_n;
  const unsigned peers = __match_any_sync(0xffffffffu, valid ? v : -1);
  const int rank = __popc(peers & ((1u << lane) - 1u));
  if (valid && rank == 0) warp_counts[warp * s_n + v] = __popc(peers);
  __syncthreads();
  if (!valid) return;
  int64_t p = excl[v * tiles + blockIdx.x] + rank;
  for (int w2 = 0; w2 < warp; ++w2) p += warp_counts[w2 * s_n + v];
  if (p >= m) return;  // only with duplicate slots in a row: dropped, as by the reference
  entry_row[p] = static_cast<int32_t>(e / k_n);
  for (int b = 0; b < w_bytes; ++b) entry_w[p * w_bytes + b] = w[e * w_bytes + b];
}

template <typename V>
__global__ void RegroupRows(const V* rows, const int32_t* entry_row, int64_t vecs, int w_bytes, V* grouped,
                            uint8_t* entry_w) {
  const int64_t p = blockIdx.x;
  const int32_t r = entry_row[p];
  CopyRow(grouped + p * vecs, r >= 0 ? rows + r * vecs : nullptr, vecs);
  if (r < 0 && threadIdx.x < w_bytes) entry_w[p * w_bytes + threadIdx.x] = 0;
}

ffi::Error RegroupCudaImpl(cudaStream_t stream, ffi::AnyBuffer rows, ffi::AnyBuffer row_slot, ffi::AnyBuffer row_w,
                           ffi::Result<ffi::AnyBuffer> grouped, ffi::Result<ffi::AnyBuffer> group_sizes,
                           ffi::Result<ffi::AnyBuffer> entry_row, ffi::Result<ffi::AnyBuffer> entry_w,
                           ffi::Result<ffi::AnyBuffer> scratch, int64_t slots_per_rank) {
  const char* op = "jem_regroup";
  RegroupDims d;
  JEM_RETURN_IF_ERROR(CheckRegroup(rows, row_slot, row_w, *grouped, *group_sizes, *entry_row, *entry_w, *scratch,
                                   slots_per_rank, &d));
  const int64_t entries = d.rows * d.topk, s_n = d.slots, m = d.entries_out;
  int32_t* sizes = static_cast<int32_t*>(group_sizes->untyped_data());
  int32_t* e_row = static_cast<int32_t*>(entry_row->untyped_data());
  if (entries == 0)
    return CudaStatus(cudaMemsetAsync(sizes, 0, s_n * sizeof(int32_t), stream), op, "clear group_sizes");
  JEM_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(e_row, 0xff, m * sizeof(int32_t), stream), op, "clear entry_row"));

  const int64_t tiles = (entries + kRegroupTile - 1) / kRegroupTile, cells = s_n * tiles;
  int32_t* count = static_cast<int32_t*>(scratch->untyped_data());
  int32_t* excl = count + cells;
  const int32_t* slot = static_cast<const int32_t*>(row_slot.untyped_data());
  RegroupCount<<<static_cast<unsigned>(tiles), kRegroupTile, s_n * sizeof(int32_t), stream>>>(slot, entries, s_n,
                                                                                              tiles, count);
  JEM_RETURN_IF_ERROR(LaunchStatus(op, "RegroupCount"));
  JEM_RETURN_IF_ERROR(ExclusiveScan(count, excl, cells, excl + cells + 1, stream, op));
  RegroupSizes<<<Blocks(s_n, 256), 256, 0, stream>>>(excl, s_n, tiles, sizes);
  JEM_RETURN_IF_ERROR(LaunchStatus(op, "RegroupSizes"));
  const size_t place_smem = kWarps * s_n * sizeof(int32_t);
  if (place_smem > 48 * 1024) {  // large slot counts need the opt-in shared memory of sm_70+
    JEM_RETURN_IF_ERROR(CudaStatus(
        cudaFuncSetAttribute(RegroupPlace, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(place_smem)),
        op, "shared memory for slots_per_rank"));
  }
  RegroupPlace<<<static_cast<unsigned>(tiles), kRegroupTile, place_smem, stream>>>(
      slot, static_cast<const uint8_t*>(row_w.untyped_data()), static_cast<int>(d.w_bytes), entries, d.topk, s_n,
      tiles, m, excl, e_row, static_cast<uint8_t*>(entry_w->untyped_data()));
  JEM_RETURN_IF_ERROR(LaunchStatus(op, "RegroupPlace"));

  const int vb = VectorBytes(d.row_bytes, rows.untyped_data(), grouped->untyped_data());
  const int64_t vecs = d.row_bytes / vb;
  WithVector(vb, [&](auto v) {
    using V = decltype(v);
    RegroupRows<V><<<static_cast<unsigned>(m), RowThreads(vecs), 0, stream>>>(
        static_cast<const V*>(rows.untyped_data()), e_row, vecs, static_cast<int>(d.w_bytes),
        static_cast<V*>(grouped->untyped_data()), static_cast<uint8_t*>(entry_w->untyped_data()));
  });
  return LaunchStatus(op, "RegroupRows");
}

}  // namespace
}  // namespace jem

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemRegroupCuda, jem::RegroupCudaImpl,
                              JEM_CUDA_BIND
                                  JEM_ARG JEM_ARG JEM_ARG
                                  JEM_RET JEM_RET JEM_RET JEM_RET JEM_RET
                                  .Attr<int64_t>("slots_per_rank"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
