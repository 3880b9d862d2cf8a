// CUDA helpers shared by the kernels: error checks, vector widths, row copies, float conversions,
// and the device-wide exclusive scan (scan.cu).
#ifndef JEM_CSRC_CUDA_CUDA_UTIL_CUH_
#define JEM_CSRC_CUDA_CUDA_UTIL_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../common.h"

namespace jem {

inline ffi::Error CudaStatus(cudaError_t err, const char* op, const char* step) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(op) + ": " + step + ": " + cudaGetErrorString(err));
}

// Checked after every launch: a bad launch configuration surfaces here, not in a later op.
inline ffi::Error LaunchStatus(const char* op, const char* kernel) { return CudaStatus(cudaGetLastError(), op, kernel); }

inline unsigned Blocks(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

// Threads for a block that walks `n` items of one row: a whole number of warps, 32 to 256.
inline int RowThreads(int64_t n) {
  const int64_t warps = (n + 31) / 32;
  return static_cast<int>(warps < 1 ? 32 : (warps > 8 ? 256 : warps * 32));
}

// Widest access (16, 8, 4, 2 or 1 bytes) that divides a row's size and both base addresses.
inline int VectorBytes(int64_t row_bytes, const void* a, const void* b) {
  const uintptr_t bits = static_cast<uintptr_t>(row_bytes) | reinterpret_cast<uintptr_t>(a) |
                         reinterpret_cast<uintptr_t>(b);
  for (int v = 16; v > 1; v /= 2)
    if (bits % v == 0) return v;
  return 1;
}

template <int kBytes> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<2> { using type = uint16_t; };
template <> struct VecOf<1> { using type = uint8_t; };

// Calls fn(V{}) with V the unsigned vector type of `bytes` bytes.
template <typename Fn>
void WithVector(int bytes, Fn&& fn) {
  switch (bytes) {
    case 16: fn(VecOf<16>::type{}); break;
    case 8: fn(VecOf<8>::type{}); break;
    case 4: fn(VecOf<4>::type{}); break;
    case 2: fn(VecOf<2>::type{}); break;
    default: fn(VecOf<1>::type{}); break;
  }
}

// The block's threads copy one row of n vectors, or clear it when src is null.
template <typename V>
__device__ inline void CopyRow(V* dst, const V* src, int64_t n) {
  if (src != nullptr) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = V{};
  }
}

__device__ inline float ToFloat(float v) { return v; }
__device__ inline float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float ToFloat(__half v) { return __half2float(v); }

template <typename T> __device__ inline T FromFloat(float f);
template <> __device__ inline float FromFloat<float>(float f) { return f; }
template <> __device__ inline __nv_bfloat16 FromFloat<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
template <> __device__ inline __half FromFloat<__half>(float f) { return __float2half_rn(f); }

// Start of a CUDA handler's binding: XLA's stream first.
#define JEM_CUDA_BIND ::xla::ffi::Ffi::Bind().Ctx<::xla::ffi::PlatformStream<cudaStream_t>>()

// out[0..n) = exclusive prefix sum of in[0..n), out[n] = total; scratch holds ScanScratchElems(n).
ffi::Error ExclusiveScan(const int32_t* in, int32_t* out, int64_t n, int32_t* scratch, cudaStream_t stream,
                         const char* op);

}  // namespace jem

#endif  // JEM_CSRC_CUDA_CUDA_UTIL_CUH_
