// Segment sums behind jem_ungroup and jem_combine (see ep/reference.py::ungroup and ::combine):
// out[r] = scale[r] * sum over entries e with index[e] == r (ascending e, float32) of w[e] * in[e].
//
// jem_ungroup  args    entry_out [M, H] float, entry_row [M] s32 (-1 pad), entry_w [M] float
//              results out [R, H] (dtype of entry_out), scratch [SegmentScratchElems(M, R)] s32
// jem_combine  args    back [N, C, H] float, src_token [N, C] s32 (-1 pad), active [N] s32,
//                      scale [T] or [0] f32 (per-token factor; [0] = none)
//              results out [T, H] (dtype of back), scratch [SegmentScratchElems(N * C, T)] s32
// Rows of an inactive rank (active[e / C] == 0) are skipped. Scratch is used by CUDA only.
#ifndef JEM_CSRC_SEGMENT_SUM_H_
#define JEM_CSRC_SEGMENT_SUM_H_

#include "common.h"

namespace jem {

struct SegmentSum {
  const void* in;
  ffi::DataType dtype;
  const int32_t* index;
  const void* weight;  // null: weight 1
  ffi::DataType weight_dtype;
  const int32_t* active;  // null: every entry live; else entry e belongs to group e / group_size
  int64_t group_size;
  const float* scale;  // null: no per-row factor
  void* out;
  int32_t* scratch;
  int64_t entries, hidden, rows;
};

// Row counts [R], row offsets [R + 1], entries bucketed by row [E], then the scan's scratch.
inline int64_t SegmentScratchElems(int64_t entries, int64_t rows) {
  return 2 * rows + 1 + entries + ScanScratchElems(rows);
}

inline ffi::Error CheckUngroup(ffi::AnyBuffer entry_out, ffi::AnyBuffer entry_row, ffi::AnyBuffer entry_w,
                               const ffi::AnyBuffer& out, const ffi::AnyBuffer& scratch, SegmentSum* s) {
  const char* op = "jem_ungroup";
  JEM_RETURN_IF_ERROR(ExpectRank(op, "entry_out", entry_out, 2));
  JEM_RETURN_IF_ERROR(ExpectRank(op, "out", out, 2));
  JEM_RETURN_IF_ERROR(ExpectFloat(op, "entry_out", entry_out));
  JEM_RETURN_IF_ERROR(ExpectFloat(op, "entry_w", entry_w));
  const int64_t m = entry_out.dimensions()[0], h = entry_out.dimensions()[1], r = out.dimensions()[0];
  JEM_RETURN_IF_ERROR(ExpectShape(op, "entry_row", entry_row, {m}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "entry_row", entry_row, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "entry_w", entry_w, {m}));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "out", out, {r, h}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "out", out, entry_out.element_type()));
  JEM_RETURN_IF_ERROR(ExpectScratch(op, scratch, SegmentScratchElems(m, r)));
  *s = SegmentSum{entry_out.untyped_data(), entry_out.element_type(),
                  static_cast<const int32_t*>(entry_row.untyped_data()), entry_w.untyped_data(),
                  entry_w.element_type(), nullptr, 1, nullptr, out.untyped_data(),
                  static_cast<int32_t*>(scratch.untyped_data()), m, h, r};
  return ffi::Error::Success();
}

inline ffi::Error CheckCombine(ffi::AnyBuffer back, ffi::AnyBuffer src_token, ffi::AnyBuffer active,
                               ffi::AnyBuffer scale, const ffi::AnyBuffer& out, const ffi::AnyBuffer& scratch,
                               SegmentSum* s) {
  const char* op = "jem_combine";
  JEM_RETURN_IF_ERROR(ExpectRank(op, "back", back, 3));
  JEM_RETURN_IF_ERROR(ExpectRank(op, "out", out, 2));
  JEM_RETURN_IF_ERROR(ExpectRank(op, "scale", scale, 1));
  JEM_RETURN_IF_ERROR(ExpectFloat(op, "back", back));
  const int64_t n = back.dimensions()[0], c = back.dimensions()[1], h = back.dimensions()[2];
  const int64_t t = out.dimensions()[0];
  JEM_RETURN_IF_ERROR(ExpectShape(op, "src_token", src_token, {n, c}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "src_token", src_token, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "active", active, {n}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "active", active, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "scale", scale, ffi::DataType::F32));
  const bool scaled = scale.dimensions()[0] != 0;
  if (scaled) JEM_RETURN_IF_ERROR(ExpectShape(op, "scale", scale, {t}));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "out", out, {t, h}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "out", out, back.element_type()));
  JEM_RETURN_IF_ERROR(ExpectScratch(op, scratch, SegmentScratchElems(n * c, t)));
  *s = SegmentSum{back.untyped_data(), back.element_type(), static_cast<const int32_t*>(src_token.untyped_data()),
                  nullptr, ffi::DataType::F32, static_cast<const int32_t*>(active.untyped_data()), c > 0 ? c : 1,
                  scaled ? static_cast<const float*>(scale.untyped_data()) : nullptr, out.untyped_data(),
                  static_cast<int32_t*>(scratch.untyped_data()), n * c, h, t};
  return ffi::Error::Success();
}

}  // namespace jem

JEM_DECLARE_HANDLER(JemUngroupCpu);
JEM_DECLARE_HANDLER(JemCombineCpu);
JEM_DECLARE_HANDLER(JemUngroupCuda);
JEM_DECLARE_HANDLER(JemCombineCuda);

#endif  // JEM_CSRC_SEGMENT_SUM_H_
