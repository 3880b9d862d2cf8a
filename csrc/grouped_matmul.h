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

// jem_grouped_matmul_fp8 (CPU): as jem_grouped_matmul with FP8 block-scaled weights, each weight tile
// dequantized (w * its block's scale, in float32) as the kernel packs it.
//   args    x [M, K] float, w [G, K, N] f8e4m3fn, scale [G, ceil(K/block_k), ceil(N/block_n)] f32,
//           group_sizes [G] s32;  attrs block_k, block_n (> 0)
//   results out [M, N] (dtype of x)
struct Fp8Blocks {
  int64_t block_k, block_n, scale_rows, scale_cols;
};

inline ffi::Error CheckGroupedMatmulFp8(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, const ffi::AnyBuffer& scale,
                                        const ffi::AnyBuffer& sizes, const ffi::AnyBuffer& out, int64_t block_k,
                                        int64_t block_n, GroupedMatmulDims* d, Fp8Blocks* b) {
  const char* op = "jem_grouped_matmul_fp8";
  JEM_RETURN_IF_ERROR(ExpectRank(op, "x", x, 2));
  JEM_RETURN_IF_ERROR(ExpectRank(op, "w", w, 3));
  JEM_RETURN_IF_ERROR(ExpectFloat(op, "x", x));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "w", w, ffi::DataType::F8E4M3FN));
  if (block_k <= 0 || block_n <= 0)
    return ffi::Error::InvalidArgument(std::string(op) + ": block_k and block_n must be positive");
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  const int64_t g = w.dimensions()[0], n = w.dimensions()[2];
  const int64_t sk = (k + block_k - 1) / block_k, sn = (n + block_n - 1) / block_n;
  JEM_RETURN_IF_ERROR(ExpectShape(op, "w", w, {g, k, n}));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "scale", scale, {g, sk, sn}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "scale", scale, ffi::DataType::F32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "group_sizes", sizes, {g}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "group_sizes", sizes, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "out", out, {m, n}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "out", out, x.element_type()));
  *d = GroupedMatmulDims{m, k, n, g};
  *b = Fp8Blocks{block_k, block_n, sk, sn};
  return ffi::Error::Success();
}

}  // namespace jem

JEM_DECLARE_HANDLER(JemGroupedMatmulCpu);
JEM_DECLARE_HANDLER(JemGroupedMatmulFp8Cpu);

#endif  // JEM_CSRC_GROUPED_MATMUL_H_
