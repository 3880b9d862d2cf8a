// jem_regroup: received rows expanded into (row, local slot) entries sorted by (slot, row, k), the
// input of a grouped matmul (see ep/reference.py::regroup). A counting sort: exact for any input.
//   args    rows [M0, H] any dtype, row_slot [M0, K] s32 (-1 none), row_w [M0, K]
//   results grouped [M, H], group_sizes [S] s32, entry_row [M] s32 (-1 pad), entry_w [M],
//           scratch [RegroupScratchElems(M0 * K, S)] s32 (used by CUDA only);  M = M0 * min(K, S)
//   attrs   slots_per_rank S (int64 > 0)
#ifndef JEM_CSRC_REGROUP_H_
#define JEM_CSRC_REGROUP_H_

#include <algorithm>

#include "common.h"

namespace jem {

struct RegroupDims {
  int64_t rows, hidden, topk, slots, entries_out, row_bytes, w_bytes;
};

// Entries handled by one CUDA block of the regroup kernels.
constexpr int64_t kRegroupTile = 256;

// Per-(slot, tile) counts [S * tiles] and their exclusive scan [S * tiles + 1], then the scan's scratch.
inline int64_t RegroupScratchElems(int64_t entries, int64_t slots) {
  const int64_t cells = slots * ((entries + kRegroupTile - 1) / kRegroupTile);
  return 2 * cells + 1 + ScanScratchElems(cells);
}

inline ffi::Error CheckRegroup(ffi::AnyBuffer rows, ffi::AnyBuffer row_slot, ffi::AnyBuffer row_w,
                               const ffi::AnyBuffer& grouped, const ffi::AnyBuffer& sizes,
                               const ffi::AnyBuffer& entry_row, const ffi::AnyBuffer& entry_w,
                               const ffi::AnyBuffer& scratch, int64_t slots_per_rank, RegroupDims* d) {
  const char* op = "jem_regroup";
  if (slots_per_rank <= 0) return ffi::Error::InvalidArgument("jem_regroup: slots_per_rank must be > 0");
  JEM_RETURN_IF_ERROR(ExpectRank(op, "rows", rows, 2));
  JEM_RETURN_IF_ERROR(ExpectRank(op, "row_slot", row_slot, 2));
  JEM_RETURN_IF_ERROR(ExpectWholeBytes(op, "rows", rows));
  JEM_RETURN_IF_ERROR(ExpectWholeBytes(op, "row_w", row_w));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "row_slot", row_slot, ffi::DataType::S32));
  const int64_t m0 = rows.dimensions()[0], h = rows.dimensions()[1], k = row_slot.dimensions()[1];
  const int64_t m = m0 * std::min(k, slots_per_rank);
  JEM_RETURN_IF_ERROR(ExpectShape(op, "row_slot", row_slot, {m0, k}));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "row_w", row_w, {m0, k}));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "grouped", grouped, {m, h}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "grouped", grouped, rows.element_type()));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "group_sizes", sizes, {slots_per_rank}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "group_sizes", sizes, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "entry_row", entry_row, {m}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "entry_row", entry_row, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "entry_w", entry_w, {m}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "entry_w", entry_w, row_w.element_type()));
  JEM_RETURN_IF_ERROR(ExpectScratch(op, scratch, RegroupScratchElems(m0 * k, slots_per_rank)));
  *d = RegroupDims{m0, h, k, slots_per_rank, m,
                   h * static_cast<int64_t>(ffi::ByteWidth(rows.element_type())),
                   static_cast<int64_t>(ffi::ByteWidth(row_w.element_type()))};
  return ffi::Error::Success();
}

}  // namespace jem

JEM_DECLARE_HANDLER(JemRegroupCpu);
JEM_DECLARE_HANDLER(JemRegroupCuda);

#endif  // JEM_CSRC_REGROUP_H_
