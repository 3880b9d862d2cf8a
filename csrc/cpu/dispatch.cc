// CPU jem_dispatch: one pass over the tokens in order; each token's row is memcpy'd once to every
// destination rank it has an entry on, then the unused tail of each rank's buffer is cleared.
#include <algorithm>
#include <cstring>
#include <vector>

#include "../dispatch.h"
#include "cpu_util.h"

namespace jem {
namespace {

ffi::Error DispatchCpuImpl(ffi::AnyBuffer x, ffi::AnyBuffer slots, ffi::AnyBuffer weights, ffi::AnyBuffer active,
                           ffi::Result<ffi::AnyBuffer> send_x, ffi::Result<ffi::AnyBuffer> send_slot,
                           ffi::Result<ffi::AnyBuffer> send_w, ffi::Result<ffi::AnyBuffer> counts,
                           ffi::Result<ffi::AnyBuffer> src_token, ffi::Result<ffi::AnyBuffer> scratch,
                           int64_t slots_per_rank) {
  DispatchDims d;
  JEM_RETURN_IF_ERROR(CheckDispatch(x, slots, weights, active, *send_x, *send_slot, *send_w, *counts, *src_token,
                                    *scratch, slots_per_rank, &d));
  const int64_t t_n = d.tokens, k_n = d.topk, n_n = d.ranks, s_n = d.slots_per_rank;
  const char* xp = static_cast<const char*>(x.untyped_data());
  const int32_t* slot = static_cast<const int32_t*>(slots.untyped_data());
  const char* wp = static_cast<const char*>(weights.untyped_data());
  const int32_t* live = static_cast<const int32_t*>(active.untyped_data());
  char* out_x = static_cast<char*>(send_x->untyped_data());
  int32_t* out_slot = static_cast<int32_t*>(send_slot->untyped_data());
  char* out_w = static_cast<char*>(send_w->untyped_data());
  int32_t* cnt = static_cast<int32_t*>(counts->untyped_data());
  int32_t* src = static_cast<int32_t*>(src_token->untyped_data());
  if (n_n == 0) return ffi::Error::Success();

  AdviseHugePages(out_x, n_n * t_n * d.row_bytes);
  std::fill(cnt, cnt + n_n, 0);
  std::vector<int64_t> seen(n_n, -1);     // last token that wrote a row to each rank
  std::vector<int64_t> dest(k_n);         // destination rank of each entry of the current token, -1 none
  for (int64_t t = 0; t < t_n; ++t) {
    const int32_t* ts = slot + t * k_n;
    for (int64_t k = 0; k < k_n; ++k) {
      const int64_t r = ts[k] >= 0 ? ts[k] / s_n : -1;
      dest[k] = (r >= 0 && r < n_n && live[r] > 0) ? r : -1;
    }
    for (int64_t k = 0; k < k_n; ++k) {
      const int64_t r = dest[k];
      if (r < 0 || seen[r] == t) continue;
      seen[r] = t;
      const int64_t row = r * t_n + cnt[r]++;
      CopyBytes(out_x + row * d.row_bytes, xp + t * d.row_bytes, d.row_bytes);
      src[row] = static_cast<int32_t>(t);
      for (int64_t j = 0; j < k_n; ++j) {
        const bool here = dest[j] == r;
        out_slot[row * k_n + j] = here ? static_cast<int32_t>(ts[j] % s_n) : -1;
        char* w_dst = out_w + (row * k_n + j) * d.w_bytes;
        if (here) CopyBytes(w_dst, wp + (t * k_n + j) * d.w_bytes, d.w_bytes);
        else ClearBytes(w_dst, d.w_bytes);
      }
    }
  }
  for (int64_t r = 0; r < n_n; ++r) {  // rows past counts[r]: zeros / -1
    const int64_t first = r * t_n + cnt[r], rest = t_n - cnt[r];
    ClearBytes(out_x + first * d.row_bytes, rest * d.row_bytes);
    std::fill(out_slot + first * k_n, out_slot + (first + rest) * k_n, -1);
    ClearBytes(out_w + first * k_n * d.w_bytes, rest * k_n * d.w_bytes);
    std::fill(src + first, src + first + rest, -1);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jem

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemDispatchCpu, jem::DispatchCpuImpl,
                              xla::ffi::Ffi::Bind()
                                  JEM_ARG JEM_ARG JEM_ARG JEM_ARG
                                  JEM_RET JEM_RET JEM_RET JEM_RET JEM_RET JEM_RET
                                  .Attr<int64_t>("slots_per_rank"));
