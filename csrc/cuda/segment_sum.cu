// CUDA jem_ungroup / jem_combine without float atomics: entries are bucketed by output row (counts,
// scan, atomic fill), each row's bucket is sorted so entries are added in ascending order as on CPU,
// then one block per output row sums its entries in float32 with 16-byte loads. Deterministic.
#include "../segment_sum.h"
#include "cuda_util.cuh"

namespace jem {
namespace {

constexpr int kSortedInShared = 64;  // buckets up to this size are sorted in shared memory

__device__ inline int32_t LiveRow(const int32_t* index, const int32_t* active, int64_t group, int64_t e,
                                  int64_t r_n) {
  const int32_t r = index[e];
  if (r < 0 || r >= r_n) return -1;
  if (active != nullptr && active[e / group] <= 0) return -1;
  return r;
}

__global__ void SegCount(const int32_t* index, const int32_t* active, int64_t group, int64_t e_n, int64_t r_n,
                         int32_t* counts) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= e_n) return;
  const int32_t r = LiveRow(index, active, group, e, r_n);
  if (r >= 0) atomicAdd(&counts[r], 1);
}

__global__ void SegFill(const int32_t* index, const int32_t* active, int64_t group, int64_t e_n, int64_t r_n,
                        int32_t* cursor, int32_t* bucket) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= e_n) return;
  const int32_t r = LiveRow(index, active, group, e, r_n);
  if (r >= 0) bucket[atomicAdd(&cursor[r], 1)] = static_cast<int32_t>(e);
}

__device__ inline float LoadWeight(const void* w, ffi::DataType dtype, int64_t e) {
  switch (dtype) {
    case ffi::DataType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[e]);
    case ffi::DataType::F16: return __half2float(static_cast<const __half*>(w)[e]);
    default: return static_cast<const float*>(w)[e];
  }
}

__device__ inline void InsertionSort(int32_t* a, int32_t n) {
  for (int32_t i = 1; i < n; ++i) {
    const int32_t v = a[i];
    int32_t j = i - 1;
    for (; j >= 0 && a[j] > v; --j) a[j + 1] = a[j];
    a[j + 1] = v;
  }
}

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T x[kVec];
};

template <typename T, int kVec>
__global__ void SegGather(const T* in, const void* weight, ffi::DataType w_dtype, const int32_t* offsets,
                          int32_t* bucket, const float* scale, int64_t h_n, T* out) {
  __shared__ int32_t ids[kSortedInShared];
  __shared__ float ws[kSortedInShared];
  const int64_t r = blockIdx.x;
  const int32_t first = offsets[r], n = offsets[r + 1] - first;
  int32_t* mine = bucket + first;
  const bool small = n <= kSortedInShared;
  if (threadIdx.x == 0) {
    if (small) {
      for (int32_t j = 0; j < n; ++j) ids[j] = mine[j];
      InsertionSort(ids, n);
      for (int32_t j = 0; j < n; ++j) ws[j] = weight != nullptr ? LoadWeight(weight, w_dtype, ids[j]) : 1.0f;
    } else {
      InsertionSort(mine, n);  // rare (many entries for one row): sorted in place, read from global
    }
  }
  __syncthreads();
  const float sc = scale != nullptr ? scale[r] : 1.0f;
  using P = Pack<T, kVec>;
  const int64_t packs = h_n / kVec;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    float acc[kVec];
    for (int q = 0; q < kVec; ++q) acc[q] = 0.0f;
    for (int32_t j = 0; j < n; ++j) {
      const int32_t e = small ? ids[j] : mine[j];
      const P v = reinterpret_cast<const P*>(in + e * h_n)[i];
      const float w = small ? ws[j] : (weight != nullptr ? LoadWeight(weight, w_dtype, e) : 1.0f);
      for (int q = 0; q < kVec; ++q) acc[q] = __fadd_rn(acc[q], __fmul_rn(w, ToFloat(v.x[q])));  // * 1.0f is exact
    }
    P o;
    for (int q = 0; q < kVec; ++q) o.x[q] = FromFloat<T>(__fmul_rn(acc[q], sc));
    reinterpret_cast<P*>(out + r * h_n)[i] = o;
  }
}

template <typename T>
ffi::Error LaunchGather(const SegmentSum& s, const int32_t* offsets, int32_t* bucket, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(T);
  const bool wide = VectorBytes(s.hidden * sizeof(T), s.in, s.out) == 16;
  const int64_t packs = wide ? s.hidden / kWide : s.hidden;
  const unsigned blocks = static_cast<unsigned>(s.rows);
  const int threads = RowThreads(packs);
  const T* in = static_cast<const T*>(s.in);
  T* out = static_cast<T*>(s.out);
  if (wide) {
    SegGather<T, kWide><<<blocks, threads, 0, stream>>>(in, s.weight, s.weight_dtype, offsets, bucket, s.scale,
                                                        s.hidden, out);
  } else {
    SegGather<T, 1><<<blocks, threads, 0, stream>>>(in, s.weight, s.weight_dtype, offsets, bucket, s.scale,
                                                    s.hidden, out);
  }
  return LaunchStatus("segment sum", "SegGather");
}

ffi::Error SegmentSumCuda(const SegmentSum& s, cudaStream_t stream, const char* op) {
  if (s.rows == 0) return ffi::Error::Success();
  int32_t* counts = s.scratch;  // becomes the fill cursor once scanned
  int32_t* offsets = counts + s.rows;
  int32_t* bucket = offsets + s.rows + 1;
  JEM_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(counts, 0, s.rows * sizeof(int32_t), stream), op, "clear counts"));
  if (s.entries > 0) {
    SegCount<<<Blocks(s.entries, 256), 256, 0, stream>>>(s.index, s.active, s.group_size, s.entries, s.rows, counts);
    JEM_RETURN_IF_ERROR(LaunchStatus(op, "SegCount"));
  }
  JEM_RETURN_IF_ERROR(ExclusiveScan(counts, offsets, s.rows, bucket + s.entries, stream, op));
  if (s.entries > 0) {
    JEM_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(counts, offsets, s.rows * sizeof(int32_t), cudaMemcpyDeviceToDevice, stream), op,
        "cursor"));
    SegFill<<<Blocks(s.entries, 256), 256, 0, stream>>>(s.index, s.active, s.group_size, s.entries, s.rows, counts,
                                                        bucket);
    JEM_RETURN_IF_ERROR(LaunchStatus(op, "SegFill"));
  }
  switch (s.dtype) {
    case ffi::DataType::F32: return LaunchGather<float>(s, offsets, bucket, stream);
    case ffi::DataType::BF16: return LaunchGather<__nv_bfloat16>(s, offsets, bucket, stream);
    case ffi::DataType::F16: return LaunchGather<__half>(s, offsets, bucket, stream);
    default: return ffi::Error::InvalidArgument(std::string(op) + ": unsupported dtype");
  }
}

ffi::Error UngroupCudaImpl(cudaStream_t stream, ffi::AnyBuffer entry_out, ffi::AnyBuffer entry_row,
                           ffi::AnyBuffer entry_w, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::AnyBuffer> scratch) {
  SegmentSum s;
  JEM_RETURN_IF_ERROR(CheckUngroup(entry_out, entry_row, entry_w, *out, *scratch, &s));
  return SegmentSumCuda(s, stream, "jem_ungroup");
}

ffi::Error CombineCudaImpl(cudaStream_t stream, ffi::AnyBuffer back, ffi::AnyBuffer src_token, ffi::AnyBuffer active,
                           ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::AnyBuffer> scratch) {
  SegmentSum s;
  JEM_RETURN_IF_ERROR(CheckCombine(back, src_token, active, scale, *out, *scratch, &s));
  return SegmentSumCuda(s, stream, "jem_combine");
}

}  // namespace
}  // namespace jem

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemUngroupCuda, jem::UngroupCudaImpl,
                              JEM_CUDA_BIND
                                  JEM_ARG JEM_ARG JEM_ARG
                                  JEM_RET JEM_RET,
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemCombineCuda, jem::CombineCudaImpl,
                              JEM_CUDA_BIND
                                  JEM_ARG JEM_ARG JEM_ARG JEM_ARG
                                  JEM_RET JEM_RET,
                              {xla::ffi::Traits::kCmdBufferCompatible});
