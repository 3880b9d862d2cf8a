// CPU jem_grouped_matmul: per group and 16-column panel of its matrix (packed once to float32),
// tiles of 4 rows x 16 columns whose float32 sums stay in registers over the whole contraction.
// Only rows inside groups are computed, so a slot that received no rows costs nothing (XLA:CPU's
// ragged_dot multiplies every row by every group's matrix and masks). Built for x86-64-v3 (AVX2,
// FMA) and for the baseline ISA; the loader picks the one the CPU supports.
#include <algorithm>
#include <cstring>
#include <vector>

#include "../grouped_matmul.h"
#include "cpu_util.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define JEM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define JEM_CLONES
#endif

namespace jem {
namespace {

#define JEM_INLINE inline __attribute__((always_inline))

// 8 floats: one AVX register in the AVX2 clone, two SSE registers in the baseline one.
typedef float F8 __attribute__((vector_size(32)));

JEM_INLINE F8 Load8(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

constexpr int64_t kCols = 16;  // columns per register tile: two F8 per row

// out[i, :16] = x[i, :k] @ panel for RB rows of x (row stride k) into out (row stride ldo); panel
// [k, 16] float32, packed. The 2 * RB sums stay in registers over the whole contraction.
template <int RB, typename T>
JEM_INLINE void Tile(const T* x, int64_t k, const float* panel, T* out, int64_t ldo) {
  F8 c0[RB], c1[RB];
  for (int i = 0; i < RB; ++i) c0[i] = c1[i] = F8{};
  for (int64_t kk = 0; kk < k; ++kk) {
    const F8 w0 = Load8(panel + kk * kCols), w1 = Load8(panel + kk * kCols + 8);
    for (int i = 0; i < RB; ++i) {
      const float a = ToFloat(x[i * k + kk]);
      c0[i] += a * w0;
      c1[i] += a * w1;
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < 8; ++j) {
      out[i * ldo + j] = FromFloat<T>(c0[i][j]);
      out[i * ldo + 8 + j] = FromFloat<T>(c1[i][j]);
    }
}

// For each group: each 16-column panel of its matrix is packed once (contiguous float32, zero
// padded past column n) and reused by every 4-row block of the group's rows.
template <typename T>
JEM_INLINE void Groups(const T* x, const T* w, const int32_t* sizes, T* out, const GroupedMatmulDims& d) {
  const int64_t m = d.rows, k = d.inner, n = d.cols;
  std::vector<float> panel(static_cast<size_t>(k * kCols));
  T tail[4 * kCols];
  int64_t row = 0;
  for (int64_t g = 0; g < d.groups && row < m; ++g) {
    const int64_t end = std::min(m, row + std::max<int64_t>(0, sizes[g]));
    const T* wg = w + g * k * n;
    for (int64_t j = 0; j < n && end > row; j += kCols) {
      const int64_t nb = std::min(kCols, n - j);
      for (int64_t kk = 0; kk < k; ++kk) {
        float* p = panel.data() + kk * kCols;
        for (int64_t c = 0; c < nb; ++c) p[c] = ToFloat(wg[kk * n + j + c]);
        for (int64_t c = nb; c < kCols; ++c) p[c] = 0.0f;
      }
      for (int64_t r = row; r < end; r += 4) {
        const int64_t rb = std::min<int64_t>(4, end - r);
        // a partial last panel is computed into `tail` (row stride 16), then copied
        T* o = nb == kCols ? out + r * n + j : tail;
        const int64_t ldo = nb == kCols ? n : kCols;
        switch (rb) {
          case 4: Tile<4>(x + r * k, k, panel.data(), o, ldo); break;
          case 3: Tile<3>(x + r * k, k, panel.data(), o, ldo); break;
          case 2: Tile<2>(x + r * k, k, panel.data(), o, ldo); break;
          default: Tile<1>(x + r * k, k, panel.data(), o, ldo);
        }
        if (nb != kCols)
          for (int64_t i = 0; i < rb; ++i) CopyBytes(out + (r + i) * n + j, tail + i * kCols, nb * sizeof(T));
      }
    }
    row = end;
  }
  ClearBytes(out + row * n, (m - row) * n * static_cast<int64_t>(sizeof(T)));
}

JEM_CLONES void GroupsF32(const float* x, const float* w, const int32_t* s, float* o, const GroupedMatmulDims& d) {
  Groups(x, w, s, o, d);
}
JEM_CLONES void GroupsBf16(const Bf16* x, const Bf16* w, const int32_t* s, Bf16* o, const GroupedMatmulDims& d) {
  Groups(x, w, s, o, d);
}
JEM_CLONES void GroupsF16(const _Float16* x, const _Float16* w, const int32_t* s, _Float16* o,
                          const GroupedMatmulDims& d) {
  Groups(x, w, s, o, d);
}

ffi::Error GroupedMatmulCpuImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer sizes,
                                ffi::Result<ffi::AnyBuffer> out) {
  GroupedMatmulDims d;
  JEM_RETURN_IF_ERROR(CheckGroupedMatmul(x, w, sizes, *out, &d));
  const int32_t* gs = static_cast<const int32_t*>(sizes.untyped_data());
  switch (x.element_type()) {
    case ffi::DataType::F32:
      GroupsF32(static_cast<const float*>(x.untyped_data()), static_cast<const float*>(w.untyped_data()), gs,
                static_cast<float*>(out->untyped_data()), d);
      break;
    case ffi::DataType::BF16:
      GroupsBf16(static_cast<const Bf16*>(x.untyped_data()), static_cast<const Bf16*>(w.untyped_data()), gs,
                 static_cast<Bf16*>(out->untyped_data()), d);
      break;
    default:
      GroupsF16(static_cast<const _Float16*>(x.untyped_data()), static_cast<const _Float16*>(w.untyped_data()),
                gs, static_cast<_Float16*>(out->untyped_data()), d);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jem

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemGroupedMatmulCpu, jem::GroupedMatmulCpuImpl,
                              xla::ffi::Ffi::Bind()
                                  JEM_ARG JEM_ARG JEM_ARG
                                  JEM_RET);
