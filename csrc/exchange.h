// jem_exchange: the cross-rank EP exchange of the multi-process runtime, inside XLA. Writes each
// destination's rows into that peer's registered receive region with Mooncake Transfer Engine,
// then a sequence-numbered signal; waits for every live source's signal against its own deadline.
// The wire format is runtime/layout.py's (header + arrays in the slot of (source, seq)), so a rank
// running this op and one running the Python Transport exchange understand each other.
//
//   args    send_counts [N] s32 (rows of block d to send to rank d), active [N] s32, step [] s32,
//           then k >= 1 arrays A_i [N, T, ...] of any whole-byte dtype (block d goes to rank d)
//   results recv_counts [N] s32 (rows received from each source; 0 for inactive ranks),
//           then k arrays R_i [N, T, ...] (block s: rows from source s, zeros past recv_counts[s])
//   attrs   context (context id from ExchangeCreate), seq_stride, seq_offset: seq = step * seq_stride +
//           seq_offset; timeout_ns: the op's deadline counts from its start.
// A failed or late peer returns an ffi::Error naming ranks and reasons ("failed" or "timed out");
// the context keeps the same record for the worker (ExchangeLastFailure).
#ifndef JEM_CSRC_EXCHANGE_H_
#define JEM_CSRC_EXCHANGE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

// The binding after Bind() (and the CUDA stream context): the operands, results and attributes above.
#define JEM_EXCHANGE_SIGNATURE                                                                       \
  .Arg<::xla::ffi::AnyBuffer>().Arg<::xla::ffi::AnyBuffer>().Arg<::xla::ffi::AnyBuffer>().RemainingArgs() \
      .Ret<::xla::ffi::AnyBuffer>().RemainingRets()                                                   \
      .Attr<int64_t>("context").Attr<int64_t>("seq_stride").Attr<int64_t>("seq_offset").Attr<int64_t>("timeout_ns")

namespace jem {
namespace exchange {

// One rank's receive region (runtime/layout.py::RegionLayout) and its registered staging memory:
// `num_ranks` blocks of staging_stride bytes (slot_bytes of payload, then a signal word at
// slot_bytes and a probe word at slot_bytes + 64).
struct Geometry {
  int64_t rank, num_ranks, buffers, slot_bytes, probes_offset, slots_offset;
  uint64_t recv_base, recv_bytes, staging_base, staging_stride;
};

struct FailureRecord {
  int64_t rank;
  std::string kind;  // "failed" (direct evidence), "timeout" (a write not done by the deadline), "silent"
  std::string reason;
};

struct PeerReport {
  int64_t rank;
  std::string state;  // "absent", "open", "failed"
  std::string reason;
  int64_t orphans;
};

// Context registry; every function returns an error message ("" on success) where it can fail.
int64_t Create(uintptr_t engine, const Geometry& geometry, std::string* error);
std::string Destroy(int64_t id);
// Installs `rank`'s address; an open peer with transfers abandoned earlier waits up to drain_ns for
// Mooncake to resolve them (as Transport.set_peers does), else stays failed.
std::string SetPeer(int64_t id, int64_t rank, const std::string& segment, uint64_t recv_base, bool open,
                    const std::string& reason, int64_t drain_ns);
std::string SetBlocked(int64_t id, int64_t rank);  // a handshake with `rank` holds Mooncake's lock; -1: none
std::string SetFault(int64_t id, bool drop, int64_t delay_ns);
// The epoch this rank is in: the high bits of every seq it writes and accepts (kEpochShift).
std::string SetEpoch(int64_t id, uint64_t epoch);
// Signals that arrived from another epoch, or from a rank not live, and were dropped (fencing).
std::string StaleSignals(int64_t id, int64_t* count);
// Writes a token from staging into this rank's own probe word through Mooncake and checks that it
// arrived: proves the declared ABI (request layout, status codes) against the loaded library.
std::string SelfTest(int64_t id, const std::string& own_segment, int64_t timeout_ns);
std::string LastFailure(int64_t id, int64_t* seq, std::vector<FailureRecord>* out);
std::string LastElapsed(int64_t id, int64_t* elapsed_ns);  // the last op's own time, for benchmarks
std::string Peers(int64_t id, std::vector<PeerReport>* out);
int64_t Reclaim(int64_t id);  // polls abandoned transfers; returns how many are still pending (-1: no context)

}  // namespace exchange
}  // namespace jem

JEM_DECLARE_HANDLER(JemExchangeCpu);
JEM_DECLARE_HANDLER(JemExchangeCuda);  // csrc/cuda/exchange.cu: operands in GPU memory, staged through pinned host memory

#endif  // JEM_CSRC_EXCHANGE_H_
