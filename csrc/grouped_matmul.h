// jem_grouped_matmul (CPU): rows of x grouped by expert slot, each group times its slot's matrix,
// with work proportional to the rows in groups (see ep/grouped_matmul.py::grouped_matmul).
//   args    x [M, K] float, w [G, K, N] (dtype of x), group_sizes [G] s32
//   results out [M, N] (dtype of x)
// Group g owns rows [sum(group_sizes[:g]), + group_sizes[g]) of x; negative sizes count as 0, and
// sizes are clipped so the groups end at row M. Rows past the last group are zero. Sums run in
// float32 over k ascending.
#ifndef JEM_CSRC_GROUPED_MATMUL_H_
#define JEM_CSRC_GROUPED_MATMUL_H_

#include "common.h"

namespace jem {

struct GroupedMatmulDims {
  int64_t rows, inner, cols, groups;
};

inline ffi::Error CheckGroupedMatmul(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w,
                                     const ffi::AnyBuffer& sizes, const ffi::AnyBuffer& out,
                                     GroupedMatmulDims* d) {
  const char* op = "jem_grouped_matmul";
  JEM_RETURN_IF_ERROR(ExpectRank(op, "x", x, 2));
  JEM_RETURN_IF_ERROR(ExpectRank(op, "w", w, 3));
  JEM_RETURN_IF_ERROR(ExpectFloat(op, "x", x));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "w", w, x.element_type()));
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  const int64_t g = w.dimensions()[0], n = w.dimensions()[2];
  JEM_RETURN_IF_ERROR(ExpectShape(op, "w", w, {g, k, n}));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "group_sizes", sizes, {g}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "group_sizes", sizes, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "out", out, {m, n}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "out", out, x.element_type()));
  *d = GroupedMatmulDims{m, k, n, g};
  return ffi::Error::Success();
}

}  // namespace jem

JEM_DECLARE_HANDLER(JemGroupedMatmulCpu);

#endif  // JEM_CSRC_GROUPED_MATMUL_H_
