// Internal to the exchange: the per-process context an op finds by id, its peers and abandoned
// transfers, and the only four Mooncake calls the data path makes (all non-blocking for an open
// segment: submission returns at once, status is a poll).
#ifndef JEM_CSRC_CPU_EXCHANGE_STATE_H_
#define JEM_CSRC_CPU_EXCHANGE_STATE_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../exchange.h"
#include "../mooncake_abi.h"

namespace jem {
namespace exchange {

using Clock = std::chrono::steady_clock;
using mooncake::Transport;
using BatchID = Transport::BatchID;

constexpr int64_t kAlign = 64;
constexpr int64_t kHeaderBytes = 576;  // runtime/layout.py HEADER_BYTES
constexpr int64_t kMaxArrays = 8;
constexpr int64_t kMaxNdim = 4;
constexpr uint64_t kMagic = 0x4A454D5F50415931ull;  // "JEM_PAY1"
// A seq is (epoch << kEpochShift) | the step's own number: every payload header and signal carries
// the epoch it was written in, and a receiver accepts only its own epoch's.
constexpr int kEpochShift = 40;

// Outcome of polling one transfer, as the Python binding's transfer_check_status reports it.
enum class Poll { kPending, kCompleted, kFailed, kTimedOut };

struct Orphan {
  BatchID batch;
  std::string what;
};

struct Peer {
  bool installed = false;
  bool open = false;
  std::string segment;
  uint64_t recv_base = 0;
  Transport::SegmentHandle handle = 0;
  std::string reason = "not in the installed peer table";
  std::vector<Orphan> orphans;  // polled until resolved; all but probes keep the staging block busy

  // The first orphan that blocks new data to this peer: a data or signal write (it may still read
  // the staging block, or land after newer data). A probe writes its own word and blocks nothing.
  const Orphan* Blocking() const {
    for (const Orphan& o : orphans)
      if (o.what != "probe") return &o;
    return nullptr;
  }

  void Fail(const std::string& why) {
    if (open) reason = why;
    open = false;
  }
};

struct Context {
  mooncake::TransferEngine* engine;
  Geometry g;
  std::mutex mu;  // one op (or control call) at a time
  std::vector<Peer> peers;
  int64_t blocked_rank = -1;
  bool drop = false;
  int64_t delay_ns = 0;
  int64_t last_seq = 0;
  uint64_t epoch = 0;              // the installed epoch (SetEpoch)
  int64_t stale = 0;               // signals seen and dropped: another epoch's, or a rank's not live
  std::vector<uint64_t> seen;      // the last value seen in each signal word
  int64_t last_elapsed_ns = 0;  // of the last op, from its start (after any injected delay) to its return
  std::vector<FailureRecord> last_failure;

  char* Staging(int64_t rank) const {
    return reinterpret_cast<char*>(g.staging_base + static_cast<uint64_t>(rank) * g.staging_stride);
  }
  char* Region() const { return reinterpret_cast<char*>(g.recv_base); }
  int64_t BufferIndex(int64_t seq) const { return seq % g.buffers; }
  int64_t SignalOffset(int64_t source, int64_t seq) const { return (source * g.buffers + BufferIndex(seq)) * kAlign; }
  int64_t ProbeOffset(int64_t source) const { return g.probes_offset + source * kAlign; }
  int64_t SlotOffset(int64_t source, int64_t seq) const {
    return g.slots_offset + (source * g.buffers + BufferIndex(seq)) * g.slot_bytes;
  }

  // One write of `length` bytes from registered local memory to `remote` in peer's segment; 0 when
  // the submission failed (peer down, segment closed).
  BatchID SubmitWrite(const Peer& peer, const void* local, uint64_t remote, size_t length);
  // Polls `batch` once; frees it when it completed or failed (Mooncake reuses the id at once).
  Poll Check(BatchID batch);
  // Polls every orphan; a failed one marks its peer failed. Returns how many are still pending.
  int64_t PollOrphans();
  // Counts the signal words written since the last scan by a rank not in `live` or in another epoch.
  void ScanStale(const int32_t* live);
};

std::shared_ptr<Context> Find(int64_t id);

// One array operand of the op and its result: block d is [T, ...] at send + d * T * row_bytes.
struct Array {
  const char* send;
  char* recv;
  int64_t row_bytes;  // bytes of one row [...] of a block
  int code;           // runtime/layout.py's dtype code
  int64_t ndim;       // of a payload array: the buffer's rank - 1
  int64_t dims[kMaxNdim];
};

// Checks the op's buffers (csrc/exchange.h); fills N, T and the arrays with the buffers' pointers.
ffi::Error CheckArgs(const ffi::AnyBuffer& send_counts, const ffi::AnyBuffer& active, const ffi::AnyBuffer& step,
                     const ffi::RemainingArgs& args, const ffi::AnyBuffer& recv_counts, const ffi::RemainingRets& rets,
                     int64_t* n, int64_t* t, std::vector<Array>* arrays);

// The exchange on host memory (arrays' send/recv, counts, live, received); the caller holds ctx->mu.
ffi::Error Exchange(Context* ctx, const int32_t* counts, const int32_t* live, int32_t step, std::vector<Array>& arrays,
                    int32_t* received, int64_t n, int64_t t, int64_t seq_stride, int64_t seq_offset, int64_t timeout_ns);

inline int64_t NanosSince(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
}

}  // namespace exchange
}  // namespace jem

#endif  // JEM_CSRC_CPU_EXCHANGE_STATE_H_
