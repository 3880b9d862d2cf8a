// Device-wide exclusive scan of int32 in three launches: scan each tile, scan the tile totals in one
// block, add each tile's offset. Used for dispatch positions, regroup offsets and segment offsets.
#include <cub/block/block_scan.cuh>

#include "cuda_util.cuh"

namespace jem {
namespace {

constexpr int kTileThreads = 256;
constexpr int kTileItems = static_cast<int>(kScanTile) / kTileThreads;
constexpr int kTotalsThreads = 1024;

__global__ void ScanTiles(const int32_t* in, int32_t* out, int64_t n, int32_t* tile_sums) {
  using BlockScan = cub::BlockScan<int32_t, kTileThreads>;
  __shared__ typename BlockScan::TempStorage tmp;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kScanTile + threadIdx.x * kTileItems;
  int32_t items[kTileItems];
  for (int i = 0; i < kTileItems; ++i) items[i] = base + i < n ? in[base + i] : 0;
  int32_t total;
  BlockScan(tmp).ExclusiveSum(items, items, total);
  for (int i = 0; i < kTileItems; ++i)
    if (base + i < n) out[base + i] = items[i];
  if (threadIdx.x == 0) tile_sums[blockIdx.x] = total;
}

// One block: exclusive scan of the tile totals in place, grand total at sums[tiles].
__global__ void ScanTileTotals(int32_t* sums, int64_t tiles) {
  using BlockScan = cub::BlockScan<int32_t, kTotalsThreads>;
  __shared__ typename BlockScan::TempStorage tmp;
  __shared__ int32_t carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t start = 0; start < tiles; start += kTotalsThreads) {
    const int64_t i = start + threadIdx.x;
    int32_t v = i < tiles ? sums[i] : 0, chunk_total;
    BlockScan(tmp).ExclusiveSum(v, v, chunk_total);
    if (i < tiles) sums[i] = v + carry;
    __syncthreads();
    if (threadIdx.x == 0) carry += chunk_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) sums[tiles] = carry;
}

__global__ void ScanAddOffsets(int32_t* out, int64_t n, const int32_t* sums, int64_t tiles) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] += sums[i / kScanTile];
  if (i == 0) out[n] = sums[tiles];
}

}  // namespace

ffi::Error ExclusiveScan(const int32_t* in, int32_t* out, int64_t n, int32_t* scratch, cudaStream_t stream,
                         const char* op) {
  if (n == 0) return CudaStatus(cudaMemsetAsync(out, 0, sizeof(int32_t), stream), op, "scan of nothing");
  const int64_t tiles = (n + kScanTile - 1) / kScanTile;
  ScanTiles<<<static_cast<unsigned>(tiles), kTileThreads, 0, stream>>>(in, out, n, scratch);
  JEM_RETURN_IF_ERROR(LaunchStatus(op, "ScanTiles"));
  ScanTileTotals<<<1, kTotalsThreads, 0, stream>>>(scratch, tiles);
  JEM_RETURN_IF_ERROR(LaunchStatus(op, "ScanTileTotals"));
  ScanAddOffsets<<<Blocks(n, 256), 256, 0, stream>>>(out, n, scratch, tiles);
  return LaunchStatus(op, "ScanAddOffsets");
}

}  // namespace jem
