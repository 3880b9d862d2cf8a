// CPU jem_regroup: a stable counting sort of the (row, k) entries by local slot. Entries are visited
// in (row, k) order, so each slot's entries come out ordered by (row, k) as the reference's stable
// argsort gives; positions past M (only reachable with duplicate slots in a row) are dropped as there.
#include <algorithm>
#include <cstring>
#include <vector>

#include "../regroup.h"
#include "cpu_util.h"

namespace jem {
namespace {

ffi::Error RegroupCpuImpl(ffi::AnyBuffer rows, ffi::AnyBuffer row_slot, ffi::AnyBuffer row_w,
                          ffi::Result<ffi::AnyBuffer> grouped, ffi::Result<ffi::AnyBuffer> group_sizes,
                          ffi::Result<ffi::AnyBuffer> entry_row, ffi::Result<ffi::AnyBuffer> entry_w,
                          ffi::Result<ffi::AnyBuffer> scratch, int64_t slots_per_rank) {
  RegroupDims d;
  JEM_RETURN_IF_ERROR(CheckRegroup(rows, row_slot, row_w, *grouped, *group_sizes, *entry_row, *entry_w, *scratch,
                                   slots_per_rank, &d));
  const int64_t entries = d.rows * d.topk, m = d.entries_out, s_n = d.slots;
  const char* src = static_cast<const char*>(rows.untyped_data());
  const int32_t* slot = static_cast<const int32_t*>(row_slot.untyped_data());
  const char* wp = static_cast<const char*>(row_w.untyped_data());
  char* out = static_cast<char*>(grouped->untyped_data());
  int32_t* sizes = static_cast<int32_t*>(group_sizes->untyped_data());
  int32_t* e_row = static_cast<int32_t*>(entry_row->untyped_data());
  char* e_w = static_cast<char*>(entry_w->untyped_data());

  AdviseHugePages(out, m * d.row_bytes);
  std::fill(sizes, sizes + s_n, 0);
  for (int64_t e = 0; e < entries; ++e)
    if (slot[e] >= 0 && slot[e] < s_n) ++sizes[slot[e]];
  std::vector<int64_t> next(s_n);  // next free position of each slot's group
  int64_t total = 0;
  for (int64_t s = 0; s < s_n; ++s) {
    next[s] = total;
    total += sizes[s];
  }
  // Indices first, then the rows in output order: the large output is written front to back once.
  for (int64_t e = 0; e < entries; ++e) {
    const int32_t s = slot[e];
    if (s < 0 || s >= s_n) continue;
    const int64_t p = next[s]++;
    if (p >= m) continue;
    e_row[p] = static_cast<int32_t>(e / d.topk);
    CopyBytes(e_w + p * d.w_bytes, wp + e * d.w_bytes, d.w_bytes);
  }
  const int64_t used = std::min(total, m);  // padding after all groups
  std::fill(e_row + used, e_row + m, -1);
  ClearBytes(e_w + used * d.w_bytes, (m - used) * d.w_bytes);
  for (int64_t p = 0; p < used; ++p) CopyBytes(out + p * d.row_bytes, src + e_row[p] * d.row_bytes, d.row_bytes);
  ClearBytes(out + used * d.row_bytes, (m - used) * d.row_bytes);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jem

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemRegroupCpu, jem::RegroupCpuImpl,
                              xla::ffi::Ffi::Bind()
                                  JEM_ARG JEM_ARG JEM_ARG
                                  JEM_RET JEM_RET JEM_RET JEM_RET JEM_RET
                                  .Attr<int64_t>("slots_per_rank"));
