// CPU jem_ungroup / jem_combine: entries are added in ascending order into a float32 accumulator
// (the output itself for float32), the order in which the reference's scatter-add adds them.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "../segment_sum.h"
#include "cpu_util.h"

namespace jem {
namespace {

template <typename T>
void SegmentSumTyped(const SegmentSum& s) {
  const int64_t h_n = s.hidden, r_n = s.rows;
  const T* in = static_cast<const T*>(s.in);
  T* out = static_cast<T*>(s.out);
  AdviseHugePages(out, r_n * h_n * static_cast<int64_t>(sizeof(T)));
  std::vector<float> acc_buf;
  float* acc;
  if constexpr (std::is_same_v<T, float>) {
    acc = out;
    std::fill(out, out + r_n * h_n, 0.0f);
  } else {
    acc_buf.assign(static_cast<size_t>(r_n * h_n), 0.0f);
    acc = acc_buf.data();
  }
  for (int64_t e = 0; e < s.entries; ++e) {
    const int32_t r = s.index[e];
    if (r < 0 || r >= r_n) continue;
    if (s.active != nullptr && s.active[e / s.group_size] <= 0) continue;
    float* a = acc + r * h_n;
    const T* x = in + e * h_n;
    if (s.weight != nullptr) {
      const float w = LoadFloat(s.weight_dtype, s.weight, e);
      for (int64_t h = 0; h < h_n; ++h) a[h] += w * ToFloat(x[h]);
    } else {
      for (int64_t h = 0; h < h_n; ++h) a[h] += ToFloat(x[h]);
    }
  }
  if (std::is_same_v<T, float> && s.scale == nullptr) return;
  for (int64_t r = 0; r < r_n; ++r) {
    const float sc = s.scale != nullptr ? s.scale[r] : 1.0f;
    const float* a = acc + r * h_n;
    T* o = out + r * h_n;
    if (s.scale != nullptr) {
      for (int64_t h = 0; h < h_n; ++h) o[h] = FromFloat<T>(a[h] * sc);
    } else {
      for (int64_t h = 0; h < h_n; ++h) o[h] = FromFloat<T>(a[h]);
    }
  }
}

ffi::Error SegmentSumCpu(const SegmentSum& s) {
  switch (s.dtype) {
    case ffi::DataType::F32: SegmentSumTyped<float>(s); break;
    case ffi::DataType::BF16: SegmentSumTyped<Bf16>(s); break;
    case ffi::DataType::F16: SegmentSumTyped<_Float16>(s); break;
    default: return ffi::Error::InvalidArgument("segment sum: unsupported dtype");
  }
  return ffi::Error::Success();
}

ffi::Error UngroupCpuImpl(ffi::AnyBuffer entry_out, ffi::AnyBuffer entry_row, ffi::AnyBuffer entry_w,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> scratch) {
  SegmentSum s;
  JEM_RETURN_IF_ERROR(CheckUngroup(entry_out, entry_row, entry_w, *out, *scratch, &s));
  return SegmentSumCpu(s);
}

ffi::Error CombineCpuImpl(ffi::AnyBuffer back, ffi::AnyBuffer src_token, ffi::AnyBuffer active, ffi::AnyBuffer scale,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> scratch) {
  SegmentSum s;
  JEM_RETURN_IF_ERROR(CheckCombine(back, src_token, active, scale, *out, *scratch, &s));
  return SegmentSumCpu(s);
}

}  // namespace
}  // namespace jem

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemUngroupCpu, jem::UngroupCpuImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemCombineCpu, jem::CombineCpuImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>());
