// CPU jem_exchange (csrc/exchange.h). Per destination: pack the rows into that peer's registered
// staging block (header + arrays, runtime/layout.py's format), one async write into the peer's
// slot for (this rank, seq); once Mooncake reports it completed, an 8-byte write of seq into the
// peer's signal word. Meanwhile poll the local signal words of every live source and copy each
// payload into XLA's result buffers. A short spin, then yields, then short sleeps, until all
// arrived, the first failure, or the op's own deadline. Mooncake is only ever polled, never waited
// on, so a hung peer cannot hold the op past its deadline; transfers still pending then are kept
// as orphans of their peer (their staging block stays untouched until Mooncake resolves them).
#include <time.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <thread>

#include "cpu_util.h"
#include "exchange_state.h"

namespace jem {
namespace exchange {
namespace {

constexpr int64_t kProbeAfterNs = 20'000'000;  // a source silent this long gets a liveness probe ...
constexpr int64_t kProbeEveryNs = 50'000'000;  // ... at most this often (as runtime/transport/common.py)
// Waiting: spin, then yield, then sleeps doubling from 50 us to 500 us (a loaded host needs its cores
// for the ranks still working and for Mooncake's threads more than for the ranks already waiting).
constexpr int64_t kSpinNs = 30'000, kYieldNs = 300'000, kSleepNs = 50'000, kMaxSleepNs = 500'000;

// runtime/layout.py's dtype codes.
int DtypeCode(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return 1;
    case ffi::DataType::F16: return 2;
    case ffi::DataType::U16: return 3;
    case ffi::DataType::S32: return 4;
    case ffi::DataType::U32: return 5;
    case ffi::DataType::S64: return 6;
    case ffi::DataType::U64: return 7;
    case ffi::DataType::U8: return 8;
    case ffi::DataType::S8: return 9;
    case ffi::DataType::S16: return 10;
    case ffi::DataType::F64: return 11;
    case ffi::DataType::PRED: return 12;
    case ffi::DataType::BF16: return 13;
    default: return 0;
  }
}

int64_t RoundUp(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

int64_t PayloadBytes(const std::vector<Array>& arrays, int64_t rows) {
  int64_t offset = kHeaderBytes;
  for (const Array& a : arrays) offset = RoundUp(offset + rows * a.row_bytes);
  return offset;
}

// Header and rows [0, rows) of block `block` of every array into `slot`; returns the bytes used.
int64_t Pack(char* slot, const std::vector<Array>& arrays, int64_t block, int64_t tokens, uint64_t seq,
             int64_t rows) {
  uint64_t header[kHeaderBytes / 8] = {};
  int64_t offset = kHeaderBytes;
  for (size_t i = 0; i < arrays.size(); ++i) {
    const Array& a = arrays[i];
    uint64_t* w = header + 8 + 8 * i;
    const int64_t nbytes = rows * a.row_bytes;
    w[0] = static_cast<uint64_t>(a.code);
    w[1] = static_cast<uint64_t>(a.ndim);
    w[2] = static_cast<uint64_t>(offset);
    w[3] = static_cast<uint64_t>(nbytes);
    w[4] = static_cast<uint64_t>(rows);
    for (int64_t d = 1; d < a.ndim; ++d) w[4 + d] = static_cast<uint64_t>(a.dims[d]);
    CopyBytes(slot + offset, a.send + block * tokens * a.row_bytes, nbytes);
    offset = RoundUp(offset + nbytes);
  }
  header[0] = kMagic;
  header[1] = seq;
  header[2] = arrays.size();
  header[3] = static_cast<uint64_t>(offset);
  CopyBytes(slot, header, kHeaderBytes);
  return offset;
}

// The payload in `slot` into block `block` of every result; "" or why it is not a valid payload.
std::string Unpack(const char* slot, int64_t slot_bytes, std::vector<Array>& arrays, int64_t block,
                   int64_t tokens, uint64_t seq, int32_t* rows_out) {
  uint64_t header[kHeaderBytes / 8];
  std::memcpy(header, slot, kHeaderBytes);
  if (header[0] != kMagic) return "bad magic";
  if (header[1] != seq) return "header carries seq " + std::to_string(header[1]) + ", expected " + std::to_string(seq);
  if (header[2] != arrays.size()) return std::to_string(header[2]) + " arrays, expected " + std::to_string(arrays.size());
  const uint64_t used = header[3];
  if (used < static_cast<uint64_t>(kHeaderBytes) || used > static_cast<uint64_t>(slot_bytes)) return "bad size";
  const int64_t rows = static_cast<int64_t>(header[8 + 4]);
  if (rows < 0 || rows > tokens) return std::to_string(rows) + " rows, more than the " + std::to_string(tokens) + " expected";
  for (size_t i = 0; i < arrays.size(); ++i) {
    const Array& a = arrays[i];
    const uint64_t* w = header + 8 + 8 * i;
    bool ok = w[0] == static_cast<uint64_t>(a.code) && w[1] == static_cast<uint64_t>(a.ndim) &&
              w[4] == static_cast<uint64_t>(rows) && w[3] == static_cast<uint64_t>(rows * a.row_bytes) &&
              w[2] >= static_cast<uint64_t>(kHeaderBytes) && w[2] + w[3] <= used;
    for (int64_t d = 1; d < a.ndim; ++d) ok = ok && w[4 + d] == static_cast<uint64_t>(a.dims[d]);
    if (!ok) return "array " + std::to_string(i) + " does not match this op's dtype and shape";
  }
  for (size_t i = 0; i < arrays.size(); ++i) {
    Array& a = arrays[i];
    char* dst = a.recv + block * tokens * a.row_bytes;
    CopyBytes(dst, slot + header[8 + 8 * i + 2], rows * a.row_bytes);
    ClearBytes(dst + rows * a.row_bytes, (tokens - rows) * a.row_bytes);
  }
  *rows_out = static_cast<int32_t>(rows);
  return "";
}

void Wait(int64_t waited_ns, int64_t* sleep_ns) {
  if (waited_ns < kSpinNs) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  } else if (waited_ns < kYieldNs) {
    std::this_thread::yield();
  } else {
    timespec ts{0, static_cast<long>(*sleep_ns)};
    nanosleep(&ts, nullptr);
    *sleep_ns = std::min(2 * *sleep_ns, kMaxSleepNs);
  }
}

struct Send {
  enum Phase { kData, kSignal, kDone, kFailed };
  int64_t dest;
  Phase phase;
  BatchID batch;
};

const char* PhaseName(Send::Phase p) { return p == Send::kData ? "data" : "signal"; }

}  // namespace

ffi::Error CheckArgs(const ffi::AnyBuffer& send_counts, const ffi::AnyBuffer& active, const ffi::AnyBuffer& step,
                     const ffi::RemainingArgs& args, const ffi::AnyBuffer& recv_counts, const ffi::RemainingRets& rets,
                     int64_t* n, int64_t* t, std::vector<Array>* arrays) {
  const char* op = "jem_exchange";
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "active", active, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectRank(op, "active", active, 1));
  *n = active.dimensions()[0];
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "send_counts", send_counts, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "send_counts", send_counts, {*n}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "recv_counts", recv_counts, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectShape(op, "recv_counts", recv_counts, {*n}));
  JEM_RETURN_IF_ERROR(ExpectDtype(op, "step", step, ffi::DataType::S32));
  JEM_RETURN_IF_ERROR(ExpectRank(op, "step", step, 0));
  if (args.size() < 1 || args.size() > static_cast<size_t>(kMaxArrays) || args.size() != rets.size())
    return ffi::Error::InvalidArgument("jem_exchange: needs 1 to 8 arrays and as many results");
  *t = -1;
  for (size_t i = 0; i < args.size(); ++i) {
    auto in = args.get<ffi::AnyBuffer>(i);
    auto out = rets.get<ffi::AnyBuffer>(i);
    if (!in.has_value() || !out.has_value()) return ffi::Error::InvalidArgument("jem_exchange: arrays must be buffers");
    auto dims = in->dimensions();
    if (dims.size() < 2 || dims.size() > static_cast<size_t>(kMaxNdim) + 1 || dims[0] != *n)
      return ffi::Error::InvalidArgument("jem_exchange: array " + std::to_string(i) + " has shape " + DimsToString(dims) +
                                         ", expected [N, T, ...] with N = " + std::to_string(*n) + " and rank <= 5");
    if (*t < 0) *t = dims[1];
    if (dims[1] != *t) return ffi::Error::InvalidArgument("jem_exchange: every array needs the same T");
    Array a{};
    a.code = DtypeCode(in->element_type());
    if (a.code == 0) return ffi::Error::InvalidArgument("jem_exchange: array " + std::to_string(i) + " has an unsupported dtype");
    JEM_RETURN_IF_ERROR(ExpectDtype(op, "result", **out, in->element_type()));
    if ((*out)->dimensions().size() != dims.size() || !std::equal(dims.begin(), dims.end(), (*out)->dimensions().begin()))
      return ffi::Error::InvalidArgument("jem_exchange: result " + std::to_string(i) + " must have its array's shape");
    a.ndim = static_cast<int64_t>(dims.size()) - 1;
    a.row_bytes = static_cast<int64_t>(ffi::ByteWidth(in->element_type()));
    for (int64_t d = 0; d < a.ndim; ++d) {
      a.dims[d] = dims[d + 1];
      if (d > 0) a.row_bytes *= dims[d + 1];
    }
    a.send = static_cast<const char*>(in->untyped_data());
    a.recv = static_cast<char*>((*out)->untyped_data());
    arrays->push_back(a);
  }
  return ffi::Error::Success();
}

ffi::Error Exchange(Context* ctx, const int32_t* counts, const int32_t* live, int32_t step, std::vector<Array>& arrays,
                    int32_t* received, int64_t n, int64_t t, int64_t seq_stride, int64_t seq_offset, int64_t timeout_ns) {
  const Geometry& g = ctx->g;
  if (n != g.num_ranks) return ffi::Error::InvalidArgument("jem_exchange: N differs from the context's rank count");
  const int64_t own = static_cast<int64_t>(step) * seq_stride + seq_offset;
  if (own < 1 || own >= (int64_t{1} << kEpochShift))
    return ffi::Error::InvalidArgument("jem_exchange: seq must be in [1, 2**40), got " + std::to_string(own));
  const int64_t seq_signed = static_cast<int64_t>(ctx->epoch << kEpochShift) | own;
  const uint64_t seq = static_cast<uint64_t>(seq_signed);
  for (int64_t r = 0; r < n; ++r) {
    if (counts[r] < 0 || counts[r] > t) return ffi::Error::InvalidArgument("jem_exchange: send_counts out of [0, T]");
    if (live[r] && r != g.rank && PayloadBytes(arrays, counts[r]) > g.slot_bytes)
      return ffi::Error::InvalidArgument("jem_exchange: " + std::to_string(counts[r]) + " rows exceed the receive slot (" +
                                         std::to_string(g.slot_bytes) + " bytes); raise max_rows");
  }
  if (ctx->delay_ns > 0) {  // fault injection: a slow rank; its deadline starts after the sleep
    timespec ts{static_cast<time_t>(ctx->delay_ns / 1'000'000'000), static_cast<long>(ctx->delay_ns % 1'000'000'000)};
    nanosleep(&ts, nullptr);
  }
  const auto t0 = Clock::now();
  ctx->PollOrphans();
  ctx->ScanStale(live);
  std::map<int64_t, FailureRecord> failed;
  auto fail = [&](int64_t rank, const char* kind, const std::string& why) {
    if (!failed.count(rank)) failed[rank] = FailureRecord{rank, kind, why};
  };
  std::vector<int64_t> waiting;
  for (int64_t r = 0; r < n; ++r) {
    received[r] = 0;
    if (r == g.rank) {
      received[r] = counts[r];
      for (Array& a : arrays) {
        CopyBytes(a.recv + r * t * a.row_bytes, a.send + r * t * a.row_bytes, counts[r] * a.row_bytes);
        ClearBytes(a.recv + (r * t + counts[r]) * a.row_bytes, (t - counts[r]) * a.row_bytes);
      }
    } else {
      if (live[r]) waiting.push_back(r);
      for (Array& a : arrays) ClearBytes(a.recv + r * t * a.row_bytes, t * a.row_bytes);
    }
  }
  std::vector<Send> sends;
  for (int64_t d : waiting) {
    Peer& peer = ctx->peers[static_cast<size_t>(d)];
    if (ctx->drop) {
      fail(g.rank, "failed", "send dropped by fault injection (drop=True on rank " + std::to_string(g.rank) + ")");
    } else if (ctx->blocked_rank >= 0) {
      fail(ctx->blocked_rank, "failed", "Mooncake is blocked by a handshake with rank " + std::to_string(ctx->blocked_rank));
    } else if (!peer.open) {
      fail(d, "failed", peer.reason);
    } else if (const Orphan* o = peer.Blocking()) {
      fail(d, "failed", "an abandoned " + o->what + " transfer to rank " + std::to_string(d) +
                            " is still in flight (peer hung or overloaded)");
    } else {
      char* staging = ctx->Staging(d);
      const int64_t used = Pack(staging, arrays, d, t, seq, counts[d]);
      const BatchID batch = ctx->SubmitWrite(peer, staging, peer.recv_base + ctx->SlotOffset(g.rank, seq_signed), used);
      if (batch == 0) {
        peer.Fail("cannot submit a write to " + peer.segment + " (peer down?)");
        fail(d, "failed", peer.reason);
      } else {
        sends.push_back({d, Send::kData, batch});
      }
    }
  }
  std::vector<BatchID> probes(static_cast<size_t>(n), 0);
  auto next_probe = t0 + std::chrono::nanoseconds(kProbeAfterNs);
  const auto deadline = t0 + std::chrono::nanoseconds(timeout_ns);
  const auto wait_start = Clock::now();
  int64_t sleep_ns = kSleepNs;
  while (true) {
    bool unsent = false;
    for (Send& s : sends) {
      if (s.phase == Send::kDone || s.phase == Send::kFailed) continue;
      Peer& peer = ctx->peers[static_cast<size_t>(s.dest)];
      const Poll p = ctx->Check(s.batch);
      if (p == Poll::kCompleted && s.phase == Send::kData) {
        uint64_t* word = reinterpret_cast<uint64_t*>(ctx->Staging(s.dest) + g.slot_bytes);
        *word = seq;
        s.batch = ctx->SubmitWrite(peer, word, peer.recv_base + ctx->SignalOffset(g.rank, seq_signed), sizeof(uint64_t));
        s.phase = Send::kSignal;
        if (s.batch == 0) {
          peer.Fail("cannot submit the signal write to " + peer.segment + " (peer down?)");
          fail(s.dest, "failed", peer.reason);
          s.phase = Send::kFailed;
        }
      } else if (p == Poll::kCompleted) {
        s.phase = Send::kDone;
      } else if (p != Poll::kPending) {
        if (p == Poll::kTimedOut) peer.orphans.push_back({s.batch, PhaseName(s.phase)});
        peer.Fail(std::string(PhaseName(s.phase)) + " write to " + peer.segment + " failed (peer down or rejected it)");
        fail(s.dest, "failed", peer.reason);
        s.phase = Send::kFailed;
      }
      unsent = unsent || (s.phase != Send::kDone && s.phase != Send::kFailed);
    }
    for (size_t i = 0; i < waiting.size();) {
      const int64_t src = waiting[i];
      const auto* signal = reinterpret_cast<const std::atomic<uint64_t>*>(ctx->Region() + ctx->SignalOffset(src, seq_signed));
      if (signal->load(std::memory_order_acquire) != seq) {
        ++i;
        continue;
      }
      const std::string bad = Unpack(ctx->Region() + ctx->SlotOffset(src, seq_signed), g.slot_bytes, arrays, src, t, seq,
                                     &received[src]);
      if (!bad.empty()) fail(src, "failed", "corrupt payload: " + bad);
      waiting.erase(waiting.begin() + static_cast<long>(i));
    }
    const auto now = Clock::now();
    // Probes an earlier exchange left in flight resolve here too: a failed one is direct evidence.
    if (now >= next_probe) ctx->PollOrphans();
    // Liveness probes of silent sources: a dead rank's write fails within milliseconds.
    for (size_t i = 0; i < waiting.size();) {
      const int64_t src = waiting[i];
      Peer& peer = ctx->peers[static_cast<size_t>(src)];
      BatchID& probe = probes[static_cast<size_t>(src)];
      if (!peer.open && probe == 0) {
        fail(src, "failed", peer.reason);
        waiting.erase(waiting.begin() + static_cast<long>(i));
        continue;
      }
      if (probe != 0) {
        const Poll p = ctx->Check(probe);
        if (p == Poll::kCompleted) probe = 0;
        if (p == Poll::kFailed || p == Poll::kTimedOut) {
          if (p == Poll::kTimedOut) peer.orphans.push_back({probe, "probe"});
          probe = 0;
          peer.Fail("probe write to " + peer.segment + " failed while waiting for its signal (peer down)");
          fail(src, "failed", peer.reason);
          waiting.erase(waiting.begin() + static_cast<long>(i));
          continue;
        }
      } else if (now >= next_probe && peer.open && peer.orphans.empty() && !failed.count(src) && ctx->blocked_rank < 0) {
        // (one probe in flight per peer, also across exchanges: one left by an earlier op is an orphan)
        char* word = ctx->Staging(src) + g.slot_bytes + kAlign;
        probe = ctx->SubmitWrite(peer, word, peer.recv_base + ctx->ProbeOffset(g.rank), sizeof(uint64_t));
        if (probe == 0) {
          peer.Fail("cannot submit a probe write to " + peer.segment + " (peer down?)");
          fail(src, "failed", peer.reason);
          waiting.erase(waiting.begin() + static_cast<long>(i));
          continue;
        }
      }
      ++i;
    }
    if (now >= next_probe) next_probe = now + std::chrono::nanoseconds(kProbeEveryNs);
    if (waiting.empty() && !unsent) break;
    const bool expired = now >= deadline;
    if (expired || !failed.empty()) {
      for (Send& s : sends) {
        if (s.phase == Send::kDone || s.phase == Send::kFailed) continue;
        Peer& peer = ctx->peers[static_cast<size_t>(s.dest)];
        peer.orphans.push_back({s.batch, PhaseName(s.phase)});
        if (expired) {
          const std::string why = std::string(PhaseName(s.phase)) + " write for seq " + std::to_string(seq) +
                                  " not completed before the deadline";
          peer.Fail(why);
          fail(s.dest, "timeout", why);
        }
      }
      if (expired)
        for (int64_t src : waiting) fail(src, "silent", "no signal for seq " + std::to_string(seq) + " before the deadline");
      break;
    }
    Wait(NanosSince(wait_start), &sleep_ns);
  }
  for (int64_t src = 0; src < n; ++src)  // probes still in flight: polled until Mooncake resolves them
    if (probes[static_cast<size_t>(src)] != 0) ctx->peers[static_cast<size_t>(src)].orphans.push_back({probes[static_cast<size_t>(src)], "probe"});
  ctx->ScanStale(live);
  ctx->last_seq = seq_signed;
  ctx->last_elapsed_ns = NanosSince(t0);
  ctx->last_failure.clear();
  if (failed.empty()) return ffi::Error::Success();
  std::string message = "jem_exchange seq " + std::to_string(seq) + " on rank " + std::to_string(g.rank) + ":";
  bool direct = false;
  for (auto& [rank, record] : failed) {
    ctx->last_failure.push_back(record);
    direct = direct || record.kind == "failed";
    message += " rank " + std::to_string(rank) + (record.kind == "failed" ? " failed (" : " timed out (") + record.reason + ");";
  }
  message.pop_back();
  return direct ? ffi::Error(ffi::ErrorCode::kUnavailable, message) : ffi::Error(ffi::ErrorCode::kDeadlineExceeded, message);
}

namespace {

ffi::Error ExchangeCpuImpl(ffi::AnyBuffer send_counts, ffi::AnyBuffer active, ffi::AnyBuffer step,
                           ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> recv_counts, ffi::RemainingRets rets,
                           int64_t ctx_id, int64_t seq_stride, int64_t seq_offset, int64_t timeout_ns) {
  int64_t n = 0, t = 0;
  std::vector<Array> arrays;
  JEM_RETURN_IF_ERROR(CheckArgs(send_counts, active, step, args, *recv_counts, rets, &n, &t, &arrays));
  auto ctx = Find(ctx_id);
  if (!ctx) return ffi::Error::InvalidArgument("jem_exchange: no exchange context " + std::to_string(ctx_id));
  std::lock_guard<std::mutex> lock(ctx->mu);
  return Exchange(ctx.get(), static_cast<const int32_t*>(send_counts.untyped_data()),
                  static_cast<const int32_t*>(active.untyped_data()), *static_cast<const int32_t*>(step.untyped_data()),
                  arrays, static_cast<int32_t*>(recv_counts->untyped_data()), n, t, seq_stride, seq_offset, timeout_ns);
}

}  // namespace
}  // namespace exchange
}  // namespace jem

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemExchangeCpu, jem::exchange::ExchangeCpuImpl,
                              xla::ffi::Ffi::Bind() JEM_EXCHANGE_SIGNATURE);
