// CPU helpers: byte copies that accept the null pointers XLA passes for empty buffers, and float
// conversions of the element types the segment sums accept.
#ifndef JEM_CSRC_CPU_CPU_UTIL_H_
#define JEM_CSRC_CPU_CPU_UTIL_H_

#include <sys/mman.h>

#include <cstdint>
#include <cstring>

#include "../common.h"

namespace jem {

inline void CopyBytes(void* dst, const void* src, int64_t n) {
  if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n));
}
inline void ClearBytes(void* dst, int64_t n) {
  if (n > 0) std::memset(dst, 0, static_cast<size_t>(n));
}

// Large XLA CPU buffers usually come from fresh mmaps (malloc maps big blocks anew), so writing an
// output first-touches every page; on a VM that costs more than the copy. Asking for transparent
// huge pages on the aligned interior makes those faults 2 MiB at a time. Advice only: no effect on
// contents, ignored where THP is off.
inline void AdviseHugePages(void* p, int64_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// Always inlined, also into functions compiled for another target (target_clones), where GCC
// leaves plain inline functions as calls.
#define JEM_CONVERT inline __attribute__((always_inline))

struct Bf16 {
  uint16_t bits;
};

JEM_CONVERT float ToFloat(float v) { return v; }
JEM_CONVERT float ToFloat(_Float16 v) { return static_cast<float>(v); }
JEM_CONVERT float ToFloat(Bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
JEM_CONVERT T FromFloat(float f);
template <>
JEM_CONVERT float FromFloat<float>(float f) { return f; }
template <>
JEM_CONVERT _Float16 FromFloat<_Float16>(float f) { return static_cast<_Float16>(f); }
// Round to nearest even, as XLA's convert does; NaN stays NaN.
template <>
JEM_CONVERT Bf16 FromFloat<Bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return Bf16{static_cast<uint16_t>(u >> 16)};
}

inline float LoadFloat(ffi::DataType dtype, const void* base, int64_t i) {
  switch (dtype) {
    case ffi::DataType::BF16: return ToFloat(static_cast<const Bf16*>(base)[i]);
    case ffi::DataType::F16: return ToFloat(static_cast<const _Float16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

}  // namespace jem

#endif  // JEM_CSRC_CPU_CPU_UTIL_H_
