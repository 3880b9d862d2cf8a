// jem_dispatch: token rows grouped by destination rank (see ep/reference.py::dispatch).
//   args    x [T, H] any dtype, slots [T, K] s32 (-1 none), weights [T, K], active [N] s32
//   results send_x [N, T, H], send_slot [N, T, K] s32, send_w [N, T, K], counts [N] s32,
//           src_token [N, T] s32, scratch [DispatchScratchElems(N, T)] s32 (used by CUDA only)
//   attrs   slots_per_rank (int64 > 0)
#ifndef JEM_CSRC_DISPATCH_H_
#define JEM_CSRC_DISPATCH_H_

#include "common.h"

namespace jem {

struct DispatchDims {
  int64_t tokens, hidden, topk, ranks, slots_per_rank, row_bytes, w_bytes;
};

// Flags [N*T] and their exclusive scan [N*T + 1], then the scan's own scratch.
inline int64_t DispatchScratchElems(int64_t ranks, int64_t tokens) {
  return 2 * ranks * tokens + 1 + ScanScratchElems(ranks * tokens);
}

inline ffi::Error CheckDispatch(ffi::AnyBuffer x, ffi::AnyBuffer slots, ffi::AnyBuffer weights, ffi::AnyBuffer active,
                                const ffi::AnyBuffer& send_x, const ffi::AnyBuffer& send_slot,
                                const ffi::AnyBuffer& send_w, const ffi::AnyBuffer& counts,
                                const ffi::AnyBuffer& src_token, const ffi::AnyBuffer& scratch,
                                int64_t slots_per_rank, DispatchDims* d) {
  const char* op = "jem_dispatch";
  if (slots_per_rank <= 0) return ffi::Error::InvalidArgument("jem_dispatch: slots_per_rank must be > 0");
  JEM_RETURN_IF_ERROR(ExpectRank(op, "x", x, 2));
  JEM_RETURN_IF_ERROR(ExpectRank(op, "slots", slots, 2));
  JEM_RETURN_IF_ERROR(ExpectRank(op, "active", active, 1));
  JEM_RETURN_IF_ERROR(ExpectWholeBytes(op, "x", x));
  JEM_RETURN_IF_ERROR(ExpectWholeBytes(op, "weights", weights));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "slots", slots, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "active", active, ffi::DataType::S32));
  const int64_t t = x.dimensions()[0], h = x.dimensions()[1];
  const int64_t k = slots.dimensions()[1], n = active.dimensions()[0];
  JEM_RETURN_IF_ERROR(ExpectShape(op, "slots", slots, {t, k}));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "weights", weights, {t, k}));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "send_x", send_x, {n, t, h}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "send_x", send_x, x.element_type()));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "send_slot", send_slot, {n, t, k}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "send_slot", send_slot, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "send_w", send_w, {n, t, k}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "send_w", send_w, weights.element_type()));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "counts", counts, {n}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "counts", counts, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "src_token", src_token, {n, t}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "src_token", src_token, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectScratch(op, scratch, DispatchScratchElems(n, t)));
  *d = DispatchDims{t, h, k, n, slots_per_rank, h * static_cast<int64_t>(ffi::ByteWidth(x.element_type())),
                    static_cast<int64_t>(ffi::ByteWidth(weights.element_type()))};
  return ffi::Error::Success();
}

}  // namespace jem

JEM_DECLARE_HANDLER(JemDispatchCpu);
JEM_DECLARE_HANDLER(JemDispatchCuda);

#endif  // JEM_CSRC_DISPATCH_H_
