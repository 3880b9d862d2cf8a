// CPU jem_grouped_matmul: per group and 16-column panel of its matrix (packed once to float32),
// tiles of 4 rows x 16 columns whose float32 sums stay in registers over the whole contraction.
// The FP8 variant (jem_grouped_matmul_fp8) dequantizes each weight tile by its block scale as it
// packs the panel, so FP8 expert slots are never expanded in memory.
// Only rows inside groups are computed, so a slot that received no rows costs nothing (XLA:CPU's
// ragged_dot multiplies every row by every group's matrix and masks). Built for x86-64-v3 (AVX2,
// FMA) and for the baseline ISA; the loader picks the one the CPU supports.
#include <algorithm>
#include <cmath>
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
// padded past column n) and reused by every 4-row block of the group's rows. load(g, kk, col) gives
// the float32 weight of group g at row kk, column col (an FP8 weight is dequantized there, one panel
// tile at a time, by its block's scale).
template <typename T, typename LoadW>
JEM_INLINE void Groups(const T* x, LoadW load, const int32_t* sizes, T* out, const GroupedMatmulDims& d) {
  const int64_t m = d.rows, k = d.inner, n = d.cols;
  std::vector<float> panel(static_cast<size_t>(k * kCols));
  T tail[4 * kCols];
  int64_t row = 0;
  for (int64_t g = 0; g < d.groups && row < m; ++g) {
    const int64_t end = std::min(m, row + std::max<int64_t>(0, sizes[g]));
    for (int64_t j = 0; j < n && end > row; j += kCols) {
      const int64_t nb = std::min(kCols, n - j);
      for (int64_t kk = 0; kk < k; ++kk) {
        float* p = panel.data() + kk * kCols;
        for (int64_t c = 0; c < nb; ++c) p[c] = load(g, kk, j + c);
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

template <typename T>
JEM_INLINE void GroupsDense(const T* x, const T* w, const int32_t* s, T* o, const GroupedMatmulDims& d) {
  const int64_t k = d.inner, n = d.cols;
  Groups(x, [=](int64_t g, int64_t kk, int64_t c) { return ToFloat(w[(g * k + kk) * n + c]); }, s, o, d);
}

JEM_CLONES void GroupsF32(const float* x, const float* w, const int32_t* s, float* o, const GroupedMatmulDims& d) {
  GroupsDense(x, w, s, o, d);
}
JEM_CLONES void GroupsBf16(const Bf16* x, const Bf16* w, const int32_t* s, Bf16* o, const GroupedMatmulDims& d) {
  GroupsDense(x, w, s, o, d);
}
JEM_CLONES void GroupsF16(const _Float16* x, const _Float16* w, const int32_t* s, _Float16* o,
                          const GroupedMatmulDims& d) {
  GroupsDense(x, w, s, o, d);
}

// float8_e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN.
struct Fp8E4m3Table {
  float v[256];
  Fp8E4m3Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
      if (e == 15 && m == 7) mag = __builtin_nanf("");
      v[b] = (b & 0x80) ? -mag : mag;
    }
  }
};

const float* Fp8Values() {
  static const Fp8E4m3Table table;
  return table.v;
}

// FP8 weights w [G, K, N] with float32 scales [G, ceil(K / bk), ceil(N / bn)].
template <typename T>
JEM_INLINE void GroupsFp8(const T* x, const uint8_t* w, const float* scale, const int32_t* s, T* o,
                          const GroupedMatmulDims& d, const Fp8Blocks& b) {
  const int64_t k = d.inner, n = d.cols, sk = b.scale_rows, sn = b.scale_cols, bk = b.block_k, bn = b.block_n;
  const float* lut = Fp8Values();
  Groups(x, [=](int64_t g, int64_t kk, int64_t c) {
    return lut[w[(g * k + kk) * n + c]] * scale[(g * sk + kk / bk) * sn + c / bn];
  }, s, o, d);
}

JEM_CLONES void Fp8F32(const float* x, const uint8_t* w, const float* sc, const int32_t* s, float* o,
                       const GroupedMatmulDims& d, const Fp8Blocks& b) {
  GroupsFp8(x, w, sc, s, o, d, b);
}
JEM_CLONES void Fp8Bf16(const Bf16* x, const uint8_t* w, const float* sc, const int32_t* s, Bf16* o,
                        const GroupedMatmulDims& d, const Fp8Blocks& b) {
  GroupsFp8(x, w, sc, s, o, d, b);
}
JEM_CLONES void Fp8F16(const _Float16* x, const uint8_t* w, const float* sc, const int32_t* s, _Float16* o,
                       const GroupedMatmulDims& d, const Fp8Blocks& b) {
  GroupsFp8(x, w, sc, s, o, d, b);
}

ffi::Error GroupedMatmulFp8CpuImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer scale, ffi::AnyBuffer sizes,
                                   ffi::Result<ffi::AnyBuffer> out, int64_t block_k, int64_t block_n) {
  GroupedMatmulDims d;
  Fp8Blocks b;
  JEM_RETURN_IF_ERROR(CheckGroupedMatmulFp8(x, w, scale, sizes, *out, block_k, block_n, &d, &b));
  const int32_t* gs = static_cast<const int32_t*>(sizes.untyped_data());
  const uint8_t* wq = static_cast<const uint8_t*>(w.untyped_data());
  const float* sc = static_cast<const float*>(scale.untyped_data());
  switch (x.element_type()) {
    case ffi::DataType::F32:
      Fp8F32(static_cast<const float*>(x.untyped_data()), wq, sc, gs, static_cast<float*>(out->untyped_data()), d, b);
      break;
    case ffi::DataType::BF16:
      Fp8Bf16(static_cast<const Bf16*>(x.untyped_data()), wq, sc, gs, static_cast<Bf16*>(out->untyped_data()), d, b);
      break;
    default:
      Fp8F16(static_cast<const _Float16*>(x.untyped_data()), wq, sc, gs,
             static_cast<_Float16*>(out->untyped_data()), d, b);
  }
  return ffi::Error::Success();
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemGroupedMatmulFp8Cpu, jem::GroupedMatmulFp8CpuImpl,
                              xla::ffi::Ffi::Bind()
                                  JEM_ARG JEM_ARG JEM_ARG JEM_ARG
                                  JEM_RET
                                  .Attr<int64_t>("block_k")
                                  .Attr<int64_t>("block_n"));
