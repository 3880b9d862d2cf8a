// Exchange contexts: created and updated from Python once per epoch / peer-table change, found by
// the op through its `ctx` attribute. Segments are opened here, never inside the op: the first
// contact with a hung peer blocks in Mooncake for ~60 s holding its engine lock, so Python only
// installs peers its Transport has already reached (the handshake is cached by then).
#include <atomic>
#include <map>
#include <thread>

#include "exchange_state.h"

namespace jem {
namespace exchange {
namespace {

std::mutex registry_mu;
std::map<int64_t, std::shared_ptr<Context>> registry;
std::atomic<int64_t> next_id{1};

}  // namespace

std::shared_ptr<Context> Find(int64_t id) {
  std::lock_guard<std::mutex> lock(registry_mu);
  auto it = registry.find(id);
  return it == registry.end() ? nullptr : it->second;
}

BatchID Context::SubmitWrite(const Peer& peer, const void* local, uint64_t remote, size_t length) {
  BatchID batch = engine->allocateBatchID(1);
  if (batch == 0 || batch == UINT64_MAX) return 0;
  Transport::TransferRequest request;
  request.opcode = Transport::TransferRequest::WRITE;
  request.source = const_cast<void*>(local);
  request.target_id = peer.handle;
  request.target_offset = remote;
  request.length = length;
  std::vector<Transport::TransferRequest> requests{request};
  mooncake::Status status = engine->submitTransfer(batch, requests);
  if (!status.ok()) {
    mooncake::Status freed = engine->freeBatchID(batch);
    return 0;
  }
  return batch;
}

Poll Context::Check(BatchID batch) {
  Transport::TransferStatus status{Transport::WAITING, 0};
  mooncake::Status s = engine->getTransferStatus(batch, 0, status);
  if (!s.ok()) return Poll::kFailed;  // an id Mooncake does not know: nothing left to free
  if (status.s == Transport::COMPLETED || status.s == Transport::FAILED) {
    mooncake::Status freed = engine->freeBatchID(batch);
    return status.s == Transport::COMPLETED ? Poll::kCompleted : Poll::kFailed;
  }
  // TIMEOUT only with MC_SLICE_TIMEOUT set; the batch is not freed yet, so it stays an orphan.
  return status.s == Transport::TIMEOUT ? Poll::kTimedOut : Poll::kPending;
}

int64_t Context::PollOrphans() {
  int64_t pending = 0;
  for (Peer& peer : peers) {
    std::vector<Orphan> keep;
    for (Orphan& orphan : peer.orphans) {
      const Poll p = Check(orphan.batch);
      if (p == Poll::kPending || p == Poll::kTimedOut) {
        keep.push_back(orphan);
      } else if (p == Poll::kFailed) {
        peer.Fail("an abandoned " + orphan.what + " transfer to " + peer.segment + " failed");
      }
    }
    peer.orphans.swap(keep);
    pending += static_cast<int64_t>(peer.orphans.size());
  }
  return pending;
}

int64_t Create(uintptr_t engine, const Geometry& g, std::string* error) {
  if (engine == 0) {
    *error = "the Mooncake engine pointer is null";
    return 0;
  }
  if (g.num_ranks < 1 || g.rank < 0 || g.rank >= g.num_ranks || g.buffers < 1 || g.slot_bytes < kHeaderBytes ||
      g.slot_bytes % kAlign || g.probes_offset < g.num_ranks * g.buffers * kAlign ||
      g.slots_offset < g.probes_offset + g.num_ranks * kAlign ||
      g.recv_bytes < static_cast<uint64_t>(g.slots_offset + g.num_ranks * g.buffers * g.slot_bytes) ||
      g.staging_stride < static_cast<uint64_t>(g.slot_bytes + 2 * kAlign) || g.recv_base % 8 || g.staging_base % 8) {
    *error = "inconsistent exchange geometry (region layout, staging) for this rank";
    return 0;
  }
  auto ctx = std::make_shared<Context>();
  ctx->engine = reinterpret_cast<mooncake::TransferEngine*>(engine);
  ctx->g = g;
  ctx->peers.resize(static_cast<size_t>(g.num_ranks));
  const int64_t id = next_id++;
  std::lock_guard<std::mutex> lock(registry_mu);
  registry[id] = ctx;
  return id;
}

std::string Destroy(int64_t id) {
  std::shared_ptr<Context> ctx;
  {
    std::lock_guard<std::mutex> lock(registry_mu);
    auto it = registry.find(id);
    if (it == registry.end()) return "no exchange context " + std::to_string(id);
    ctx = it->second;
    registry.erase(it);
  }
  std::lock_guard<std::mutex> lock(ctx->mu);  // an op still running keeps its own reference
  return "";
}

std::string SetPeer(int64_t id, int64_t rank, const std::string& segment, uint64_t recv_base, bool open,
                    const std::string& reason, int64_t drain_ns) {
  auto ctx = Find(id);
  if (!ctx) return "no exchange context " + std::to_string(id);
  std::lock_guard<std::mutex> lock(ctx->mu);
  if (rank < 0 || rank >= ctx->g.num_ranks || rank == ctx->g.rank) return "peer rank out of range or this rank";
  ctx->PollOrphans();
  Peer& peer = ctx->peers[static_cast<size_t>(rank)];
  const bool same = peer.installed && peer.segment == segment && peer.recv_base == recv_base;
  peer.installed = true;
  peer.recv_base = recv_base;
  if (!same) {
    peer.segment = segment;
    peer.handle = 0;
  }
  peer.open = false;
  if (!open) {
    peer.reason = reason.empty() ? "not connected" : reason;
    return "";
  }
  const auto t0 = Clock::now();
  while (peer.Blocking() && NanosSince(t0) < drain_ns) {  // a re-admitted slow peer: its old writes first
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    ctx->PollOrphans();
  }
  if (peer.Blocking()) {
    peer.reason = "transfers to " + segment + " abandoned earlier are still in flight";
    return "";
  }
  if (peer.handle == 0) {
    // Cached by Mooncake since the Python Transport's handshake with this segment: returns at once.
    const Transport::SegmentHandle handle = ctx->engine->openSegment(segment);
    if (handle == static_cast<Transport::SegmentHandle>(-1)) {
      peer.reason = "cannot open segment " + segment;
      return "";
    }
    peer.handle = handle;
  }
  peer.open = true;
  peer.reason.clear();
  return "";
}

std::string SetBlocked(int64_t id, int64_t rank) {
  auto ctx = Find(id);
  if (!ctx) return "no exchange context " + std::to_string(id);
  std::lock_guard<std::mutex> lock(ctx->mu);
  ctx->blocked_rank = rank;
  return "";
}

std::string SetFault(int64_t id, bool drop, int64_t delay_ns) {
  auto ctx = Find(id);
  if (!ctx) return "no exchange context " + std::to_string(id);
  std::lock_guard<std::mutex> lock(ctx->mu);
  ctx->drop = drop;
  ctx->delay_ns = delay_ns < 0 ? 0 : delay_ns;
  return "";
}

std::string SetEpoch(int64_t id, uint64_t epoch) {
  auto ctx = Find(id);
  if (!ctx) return "no exchange context " + std::to_string(id);
  if (epoch >= (uint64_t{1} << (63 - kEpochShift))) return "epoch " + std::to_string(epoch) + " too large";
  std::lock_guard<std::mutex> lock(ctx->mu);
  ctx->epoch = epoch;
  return "";
}

std::string StaleSignals(int64_t id, int64_t* count) {
  auto ctx = Find(id);
  if (!ctx) return "no exchange context " + std::to_string(id);
  std::lock_guard<std::mutex> lock(ctx->mu);
  *count = ctx->stale;
  return "";
}

void Context::ScanStale(const int32_t* live) {
  const size_t words = static_cast<size_t>(g.num_ranks * g.buffers);
  if (seen.size() != words) seen.assign(words, 0);
  for (int64_t src = 0; src < g.num_ranks; ++src) {
    if (src == g.rank) continue;
    for (int64_t b = 0; b < g.buffers; ++b) {
      const auto* word = reinterpret_cast<const std::atomic<uint64_t>*>(Region() + (src * g.buffers + b) * kAlign);
      const uint64_t value = word->load(std::memory_order_acquire);
      uint64_t& last = seen[static_cast<size_t>(src * g.buffers + b)];
      if (value == last) continue;
      last = value;
      if (!live[src] || (value >> kEpochShift) != epoch) ++stale;
    }
  }
}

std::string SelfTest(int64_t id, const std::string& own_segment, int64_t timeout_ns) {
  auto ctx = Find(id);
  if (!ctx) return "no exchange context " + std::to_string(id);
  std::lock_guard<std::mutex> lock(ctx->mu);
  const Geometry& g = ctx->g;
  Peer self;
  self.segment = own_segment;
  self.handle = ctx->engine->openSegment(own_segment);
  if (self.handle == static_cast<Transport::SegmentHandle>(-1)) return "openSegment(" + own_segment + ") failed";
  // The probe word of this rank in its own region: no peer ever writes it.
  volatile uint64_t* target = reinterpret_cast<volatile uint64_t*>(ctx->Region() + ctx->ProbeOffset(g.rank));
  uint64_t* token = reinterpret_cast<uint64_t*>(ctx->Staging(g.rank) + g.slot_bytes + kAlign);
  const uint64_t value = 0x53454C4654455354ull ^ static_cast<uint64_t>(Clock::now().time_since_epoch().count());
  *target = 0;
  *token = value;
  const BatchID batch = ctx->SubmitWrite(self, token, g.recv_base + ctx->ProbeOffset(g.rank), sizeof(uint64_t));
  if (batch == 0) return "submitTransfer of an 8-byte write to this rank's own segment failed";
  const auto t0 = Clock::now();
  Poll p = Poll::kPending;
  while ((p = ctx->Check(batch)) == Poll::kPending && NanosSince(t0) < timeout_ns) std::this_thread::yield();
  if (p == Poll::kPending || p == Poll::kTimedOut) {
    ctx->peers[static_cast<size_t>(g.rank)].orphans.push_back({batch, "self-test"});
    return "a self-test write did not complete within the timeout (status layout mismatch?)";
  }
  if (p == Poll::kFailed) return "Mooncake reported the self-test write as failed";
  if (*target != value) return "the self-test write completed but its bytes did not arrive (request layout mismatch?)";
  return "";
}

std::string LastFailure(int64_t id, int64_t* seq, std::vector<FailureRecord>* out) {
  auto ctx = Find(id);
  if (!ctx) return "no exchange context " + std::to_string(id);
  std::lock_guard<std::mutex> lock(ctx->mu);
  *seq = ctx->last_seq & ((int64_t{1} << kEpochShift) - 1);  // the step's own number, without the epoch
  *out = ctx->last_failure;
  return "";
}

std::string LastElapsed(int64_t id, int64_t* elapsed_ns) {
  auto ctx = Find(id);
  if (!ctx) return "no exchange context " + std::to_string(id);
  std::lock_guard<std::mutex> lock(ctx->mu);
  *elapsed_ns = ctx->last_elapsed_ns;
  return "";
}

std::string Peers(int64_t id, std::vector<PeerReport>* out) {
  auto ctx = Find(id);
  if (!ctx) return "no exchange context " + std::to_string(id);
  std::lock_guard<std::mutex> lock(ctx->mu);
  ctx->PollOrphans();
  out->clear();
  for (int64_t r = 0; r < ctx->g.num_ranks; ++r) {
    const Peer& p = ctx->peers[static_cast<size_t>(r)];
    if (r == ctx->g.rank) continue;
    out->push_back({r, !p.installed ? "absent" : (p.open ? "open" : "failed"), p.open ? "" : p.reason,
                    static_cast<int64_t>(p.orphans.size())});
  }
  return "";
}

int64_t Reclaim(int64_t id) {
  auto ctx = Find(id);
  if (!ctx) return -1;
  std::lock_guard<std::mutex> lock(ctx->mu);
  return ctx->PollOrphans();
}

}  // namespace exchange
}  // namespace jem
