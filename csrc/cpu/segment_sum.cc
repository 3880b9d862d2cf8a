// CPU jem_ungroup / jem_combine: each output row's entries are added in ascending order into a
// float32 accumulator, the order in which the reference's scatter-add adds them.
#include <algorithm>
#include <vector>

#include "../segment_sum.h"
#include "cpu_util.h"

namespace jem {
namespace {

// Buckets the live entries by output row, keeping ascending entry order within a row (a stable
// counting sort into the scratch buffer), then writes each output row once from a float32 row
// accumulator. Same additions in the same order as a sequential scatter-add.
template <typename T>
void SegmentSumTyped(const SegmentSum& s) {
  const int64_t h_n = s.hidden, r_n = s.rows;
  const T* in = static_cast<const T*>(s.in);
  T* out = static_cast<T*>(s.out);
  AdviseHugePages(out, r_n * h_n * static_cast<int64_t>(sizeof(T)));
  int32_t* cursor = s.scratch;           // [R]
  int32_t* offset = cursor + r_n;        // [R + 1]
  int32_t* bucket = offset + r_n + 1;    // [E]
  auto live_row = [&](int64_t e) -> int32_t {
    const int32_t r = s.index[e];
    if (r < 0 || r >= r_n) return -1;
    if (s.active != nullptr && s.active[e / s.group_size] <= 0) return -1;
    return r;
  };
  std::fill(cursor, cursor + r_n, 0);
  for (int64_t e = 0; e < s.entries; ++e) {
    const int32_t r = live_row(e);
    if (r >= 0) ++cursor[r];
  }
  offset[0] = 0;
  for (int64_t r = 0; r < r_n; ++r) {
    offset[r + 1] = offset[r] + cursor[r];
    cursor[r] = offset[r];
  }
  for (int64_t e = 0; e < s.entries; ++e) {
    const int32_t r = live_row(e);
    if (r >= 0) bucket[cursor[r]++] = static_cast<int32_t>(e);
  }
  std::vector<float> acc(static_cast<size_t>(h_n));
  for (int64_t r = 0; r < r_n; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int32_t j = offset[r]; j < offset[r + 1]; ++j) {
      const int64_t e = bucket[j];
      const T* x = in + e * h_n;
      const float w = s.weight != nullptr ? LoadFloat(s.weight_dtype, s.weight, e) : 1.0f;  // * 1.0f is exact
      for (int64_t h = 0; h < h_n; ++h) acc[h] += w * ToFloat(x[h]);
    }
    T* o = out + r * h_n;
    const float sc = s.scale != nullptr ? s.scale[r] : 1.0f;
    for (int64_t h = 0; h < h_n; ++h) o[h] = FromFloat<T>(acc[h] * sc);
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
                                  JEM_ARG JEM_ARG JEM_ARG
                                  JEM_RET JEM_RET);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemCombineCpu, jem::CombineCpuImpl,
                              xla::ffi::Ffi::Bind()
                                  JEM_ARG JEM_ARG JEM_ARG JEM_ARG
                                  JEM_RET JEM_RET);
