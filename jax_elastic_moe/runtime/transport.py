"""Mooncake Transfer Engine transport for one rank of the expert-parallel exchange.

One `Transport` per rank process. It starts a TransferEngine (P2P handshake, no metadata server),
registers a receive region laid out by `RegionLayout` (and optionally a weights region), and moves
payloads with one-sided writes:

    send(dest, arrays, seq):  pack arrays into a registered staging slot, write them into dest's
                              slot for this source, wait for that write to complete, then write the
                              uint64 `seq` into dest's signal word for this source.
    recv(sources, seq, ...):  poll the local signal words until every source shows `seq`.

The signal never becomes visible before its data: the signal write is only submitted after Mooncake
reports the data write COMPLETED, which for TCP (protocol v2, acknowledged framing) means applied at
the destination, and for RDMA means the reliable-connection write was acknowledged by the remote NIC.

No call blocks past the caller's deadline. A hung (SIGSTOPped) peer stalls Mooncake's sync calls for
~30 s, so every transfer is submitted with `batch_transfer_async_write` (one request per batch:
`transfer_check_status` only inspects task 0 of a batch) and polled with the non-blocking
`transfer_check_status`. A transfer still pending at the deadline is abandoned: its batch id is kept
as an *orphan* and polled until Mooncake resolves it (its stall timeout, `stall_timeout_s`, fails it)
so the batch descriptor is freed and the source buffer is not reused while Mooncake may still read it.
The first contact with a peer (segment handshake) blocks inside Mooncake with the engine lock held for
up to 60 s when the peer is hung, so it happens only in `set_peers`, on a helper thread, bounded by a
deadline; while such a handshake is stuck every submission fails fast naming the stuck rank.

Not thread-safe: one thread (the rank's main loop) drives a Transport.
"""
from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Mapping, Sequence

import numpy as np

from .layout import PayloadError, RegionLayout, aligned_buffer, check_seq, pack_payload, unpack_payload
from .peers import ExchangeResult, PeerAddress, PeerFailure

__all__ = ["ExchangeResult", "PeerAddress", "PeerFailure", "SendHandle", "Transport"]

DEFAULT_EXCHANGE_TIMEOUT = 0.5
DEFAULT_CONNECT_TIMEOUT = 5.0
_POLL_MIN_S = 20e-6
_POLL_MAX_S = 1e-3
_PROBE_AFTER_S = 0.02  # a source silent this long into a wait gets liveness probes ...
_PROBE_EVERY_S = 0.05  # ... at most this often
# transfer_check_status codes (mooncake-integration/transfer_engine/transfer_engine_py.cpp)
_PENDING, _COMPLETED, _FAILED, _TIMED_OUT = 0, 1, -1, -2


class SendHandle:
    """One send in flight: its data write, then its signal write. Driven by the Transport."""

    DATA, SIGNAL, DONE, FAILED = "data", "signal", "done", "failed"
    __slots__ = ("dest", "seq", "state", "batch_id", "reason", "suspect", "_peer")

    def __init__(self, dest: int, seq: int, peer=None):
        self.dest, self.seq, self._peer = dest, seq, peer
        self.state, self.batch_id, self.reason, self.suspect = self.DATA, 0, "", dest

    @property
    def done(self) -> bool:
        return self.state in (self.DONE, self.FAILED)

    def __repr__(self):
        return f"SendHandle(dest={self.dest}, seq={self.seq}, state={self.state!r})"


class _Orphan:
    """An abandoned transfer: polled until Mooncake resolves it so its batch id is freed."""

    __slots__ = ("batch_id", "what", "keepalive")

    def __init__(self, batch_id: int, what: str, keepalive):
        self.batch_id, self.what, self.keepalive = batch_id, what, keepalive


class _Peer:
    """Connection state of one remote rank at one address."""

    def __init__(self, address: PeerAddress, staging: np.ndarray):
        self.address = address
        self.state = "unopened"  # -> "open" -> "failed"; only "open" peers get transfers
        self.reason = "connection not opened"
        self.staging = staging  # [slot_bytes + 64] uint8, registered; signal word in the tail
        self.inflight: SendHandle | None = None
        self.orphans: list[_Orphan] = []

    def fail(self, reason: str):
        if self.state != "failed":
            self.state, self.reason = "failed", reason


class Transport:
    """Mooncake transport endpoint of one rank.

    Args:
      rank, num_ranks: this rank's id and the job's rank count.
      max_rows, row_bytes, meta_bytes: per-source slot capacity (see RegionLayout).
      host: address Mooncake listens on (127.0.0.1 for loopback).
      protocol: "tcp" or "rdma" (Mooncake picks RDMA devices by discovery; `device_name` filters).
      weights_bytes: size of a second registered region for expert weights (0: none); peers read
        and write it with `read` / `write`.
      buffers_per_source: receive slots per source (seq s uses s % buffers_per_source).
      exchange_timeout: default seconds `exchange` waits before naming silent peers.
      stall_timeout_s: Mooncake's TCP no-progress timeout in whole seconds: how long an abandoned
        transfer to a hung peer lingers before Mooncake fails it (default 30 s in Mooncake). Sets the
        process-wide MC_TCP_PROGRESS_TIMEOUT_SEC / MC_TCP_STATUS_TIMEOUT_SEC, read by Mooncake per
        connection; None leaves them alone.
      drop: fault injection, every send to another rank fails immediately.
      delay_s: fault injection, the first send/recv of each seq sleeps this long first.
    """

    def __init__(self, rank: int, num_ranks: int, max_rows: int, row_bytes: int, meta_bytes: int, *,
                 host: str = "127.0.0.1", protocol: str = "tcp", device_name: str = "",
                 weights_bytes: int = 0, buffers_per_source: int = 2,
                 exchange_timeout: float = DEFAULT_EXCHANGE_TIMEOUT, stall_timeout_s: int | None = 5,
                 drop: bool = False, delay_s: float = 0.0):
        self.layout = RegionLayout(num_ranks, max_rows, row_bytes, meta_bytes, buffers_per_source)
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_ranks:
            raise ValueError(f"rank must be an int in [0, {num_ranks}), got {rank!r}")
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"protocol must be 'tcp' or 'rdma', got {protocol!r}")
        if not isinstance(weights_bytes, (int, np.integer)) or weights_bytes < 0:
            raise ValueError(f"weights_bytes must be an int >= 0, got {weights_bytes!r}")
        if not exchange_timeout > 0:
            raise ValueError(f"exchange_timeout must be > 0 seconds, got {exchange_timeout!r}")
        if stall_timeout_s is not None and (not isinstance(stall_timeout_s, int) or stall_timeout_s < 1):
            raise ValueError(f"stall_timeout_s must be an int >= 1 (seconds) or None, got {stall_timeout_s!r}")
        self.rank, self.num_ranks = int(rank), int(num_ranks)
        self.exchange_timeout = float(exchange_timeout)
        self._drop, self._delay_s, self._delayed_seq = False, 0.0, None
        self.set_fault(drop=drop, delay_s=delay_s)
        if stall_timeout_s is not None:
            for var in ("MC_TCP_PROGRESS_TIMEOUT_SEC", "MC_TCP_STATUS_TIMEOUT_SEC"):
                os.environ[var] = str(stall_timeout_s)
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Transport needs Mooncake: pip install 'jax-elastic-moe[elastic]' "
                              "(mooncake-transfer-engine-non-cuda)") from e
        self._te = TransferEngine()
        if self._te.initialize(host, "P2PHANDSHAKE", protocol, device_name) != 0:
            raise RuntimeError(f"Mooncake TransferEngine failed to start on {host!r} ({protocol})")
        self._closed = False
        self._registered: list[np.ndarray] = []
        self._recv = self._register(aligned_buffer(self.layout.region_bytes), "receive region")
        self._weights = (self._register(aligned_buffer(weights_bytes), "weights region")
                         if weights_bytes else np.zeros(0, dtype=np.uint8))
        self._scratch = self._register(aligned_buffer(64), "probe word")
        signal_words = self.layout.probes_offset // 8
        self._signals = self._recv[:self.layout.probes_offset].view(np.uint64)[:signal_words].reshape(
            num_ranks, buffers_per_source, 8)[:, :, 0]
        self._address = PeerAddress(
            rank=self.rank, host=host, rpc_port=int(self._te.get_rpc_port()),
            recv_base=int(self._recv.ctypes.data), recv_nbytes=int(self._recv.nbytes),
            weights_base=int(self._weights.ctypes.data) if weights_bytes else 0,
            weights_nbytes=int(weights_bytes), layout=self.layout.as_tuple(),
            token=secrets.randbits(63))
        self._scratch[:8].view(np.uint64)[0] = self._address.token
        self._peers: dict[int, _Peer] = {}
        self._retired: list[_Peer] = []  # replaced peers whose orphans are still pending
        self._segment_tokens: dict[str, int] = {}
        self._pending: list[SendHandle] = []
        self._opener: threading.Thread | None = None
        self._opener_rank: int | None = None
        self._late_probes: list[tuple[_Peer, int]] = []

    # ------------------------------------------------------------------ setup

    def _register(self, array: np.ndarray, what: str) -> np.ndarray:
        rc = self._te.register_memory(int(array.ctypes.data), int(array.nbytes))
        if rc != 0:
            raise RuntimeError(f"Mooncake register_memory failed for the {what} ({array.nbytes} bytes): {rc}")
        self._registered.append(array)
        return array

    def _unregister(self, array: np.ndarray):
        for i, held in enumerate(self._registered):
            if held is array:
                self._te.unregister_memory(int(array.ctypes.data))
                del self._registered[i]
                return

    def register_array(self, array: np.ndarray) -> np.ndarray:
        """Register a C-contiguous host array so `read` / `write` may use it as local memory."""
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or array.nbytes == 0:
            raise ValueError("register_array needs a non-empty C-contiguous numpy array")
        return self._register(array, "caller array")

    @property
    def address(self) -> PeerAddress:
        return self._address

    @property
    def weights(self) -> np.ndarray:
        """This rank's registered weights region (uint8, `weights_bytes` long)."""
        return self._weights

    @property
    def drop(self) -> bool:
        return self._drop

    @property
    def delay_s(self) -> float:
        return self._delay_s

    def set_fault(self, *, drop: bool | None = None, delay_s: float | None = None):
        """Change fault injection at run time (None leaves a setting unchanged)."""
        if drop is not None:
            if not isinstance(drop, bool):
                raise TypeError(f"drop must be a bool, got {type(drop).__name__}")
            self._drop = drop
        if delay_s is not None:
            if not isinstance(delay_s, (int, float)) or not 0 <= delay_s < 3600:
                raise ValueError(f"delay_s must be seconds in [0, 3600), got {delay_s!r}")
            self._delay_s = float(delay_s)

    @property
    def orphan_count(self) -> int:
        """Abandoned transfers Mooncake has not resolved yet (each holds a batch descriptor)."""
        return sum(len(p.orphans) for p in [*self._peers.values(), *self._retired])

    def reclaim(self) -> int:
        """Drive sends in flight and reclaim abandoned transfers Mooncake has resolved since; call it
        when idle (every send, set_peers, read and write does it too). Returns `orphan_count`."""
        self._engine_blocker()
        self._advance_pending()
        self._poll_orphans()
        return self.orphan_count

    def peer_state(self, rank: int) -> tuple[str, str]:
        """(state, reason) of the connection to `rank`: unopened, open or failed."""
        peer = self._peers.get(rank)
        if peer is None:
            return ("absent", f"rank {rank} is not in the installed peer table")
        return (peer.state, peer.reason if peer.state != "open" else "")

    def set_peers(self, peers: Mapping[int, PeerAddress | Mapping], timeout: float = DEFAULT_CONNECT_TIMEOUT):
        """Install the peer table (replacing the previous one) and open connections to new peers.

        `peers` maps rank -> PeerAddress (or its dict); this rank's own entry, if present, must be
        this Transport's address. A rank whose address changed (a restarted process) gets a fresh
        connection; unchanged open peers are kept. Each new connection is probed with an 8-byte write
        into the peer's probe word, bounded by `timeout` seconds.

        Raises PeerFailure naming the ranks that could not be reached; every other rank is installed.
        Raises ValueError for a malformed table (ranks out of range, layout mismatch, own entry wrong).
        """
        self._check_rank(self.rank, "this rank")  # raises if closed
        table = self._check_table(peers)
        deadline = time.monotonic() + timeout
        self._poll_orphans()
        new_peers, to_open, failed = {}, [], {}
        for rank, address in sorted(table.items()):
            if rank == self.rank:
                continue
            old = self._peers.get(rank)
            if old is not None and old.address == address and old.state == "open":
                new_peers[rank] = old
                continue
            known = self._segment_tokens.get(address.segment)
            if old is not None and old.address == address and old.orphans:
                self._drain_orphans(old, deadline)  # a re-admitted slow peer: its old writes first
            reuse = old is not None and not old.orphans and known in (None, address.token)
            peer = _Peer(address, old.staging if reuse else self._new_staging())
            if old is not None and not reuse:
                self._retired.append(old)
            new_peers[rank] = peer
            if known is not None and known != address.token:
                # Mooncake caches segment descriptors by name for the life of the engine
                peer.fail(f"segment {address.segment} was used by an earlier incarnation of a rank; "
                          "Mooncake keeps its cached descriptor, so restart the rank on a new rpc port")
                failed[rank] = peer.reason
            elif old is not None and old.orphans:
                peer.fail(f"transfers to {address.segment} abandoned earlier are still in flight")
                failed[rank] = peer.reason
            else:
                to_open.append(peer)
        self._retired.extend(old for rank, old in self._peers.items() if rank not in new_peers)
        self._peers = new_peers
        failed.update(self._open(to_open, deadline))
        if failed:
            raise PeerFailure.from_failures(failed)

    def _check_table(self, peers) -> dict[int, PeerAddress]:
        if not isinstance(peers, Mapping):
            raise TypeError(f"peers must be a mapping rank -> address, got {type(peers).__name__}")
        table = {}
        for rank, value in peers.items():
            address = PeerAddress.coerce(value)
            if not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.num_ranks:
                raise ValueError(f"peer rank {rank!r} out of range [0, {self.num_ranks})")
            if address.rank != rank:
                raise ValueError(f"peer table entry {rank} holds the address of rank {address.rank}")
            if address.layout != self.layout.as_tuple():
                raise ValueError(f"rank {rank} has region layout {address.layout}, this rank has "
                                 f"{self.layout.as_tuple()} (num_ranks, max_rows, row_bytes, meta_bytes, buffers)")
            if rank == self.rank and address != self._address:
                raise ValueError(f"peer table entry for this rank ({rank}) is not this Transport's address")
            table[int(rank)] = address
        return table

    def _new_staging(self) -> np.ndarray:
        return self._register(aligned_buffer(self.layout.slot_bytes + 64), "send staging")

    def _engine_blocker(self) -> int | None:
        """Rank whose stuck handshake holds Mooncake's submission lock, if any."""
        if self._opener is not None and not self._opener.is_alive():
            for peer, batch_id in self._late_probes:  # probes submitted after set_peers gave up
                if batch_id:
                    peer.orphans.append(_Orphan(batch_id, "probe", None))
                    if self._peers.get(peer.address.rank) is not peer:
                        self._retired.append(peer)
            self._opener, self._opener_rank, self._late_probes = None, None, []
        return self._opener_rank if self._opener is not None else None

    def _open(self, peers: list[_Peer], deadline: float) -> dict[int, str]:
        """Probe-write each peer on a helper thread (the first write runs Mooncake's segment handshake,
        which blocks for up to 60 s against a hung peer); poll the probes until `deadline`."""
        if not peers:
            return {}
        blocker = self._engine_blocker()
        if blocker is not None:
            reason = f"Mooncake is blocked by a handshake with rank {blocker}"
            for peer in peers:
                peer.fail(reason)
            return {p.address.rank: reason for p in peers}
        batch_ids: dict[int, int] = {}
        lock, cancelled = threading.Lock(), []
        late = self._late_probes = []

        def submit_probes():
            for peer in peers:
                if cancelled:
                    return
                self._opener_rank = peer.address.rank
                remote = peer.address.recv_base + self.layout.probe_offset(self.rank)
                batch_id = self._te.batch_transfer_async_write(
                    peer.address.segment, [int(self._scratch.ctypes.data)], [remote], [8])
                with lock:
                    (late.append((peer, batch_id)) if cancelled else
                     batch_ids.__setitem__(peer.address.rank, batch_id))

        opener = threading.Thread(target=submit_probes, name=f"mooncake-open-rank{self.rank}", daemon=True)
        self._opener = opener
        opener.start()
        opener.join(max(0.0, deadline - time.monotonic()))
        with lock:
            cancelled.append(True)
            batch_ids = dict(batch_ids)
        failed = {}
        if opener.is_alive():
            stuck = peers[0].address.rank if self._opener_rank is None else self._opener_rank
            failed[stuck] = "connection handshake did not finish before the deadline (peer hung?)"
        else:
            self._engine_blocker()
        for peer in peers:
            rank = peer.address.rank
            if batch_ids.get(rank):  # Mooncake opened (and now caches) this segment
                self._segment_tokens[peer.address.segment] = peer.address.token
            if rank in failed:
                peer.fail(failed[rank])
            elif rank not in batch_ids:
                peer.fail(f"not connected: Mooncake is blocked by a handshake with rank {self._opener_rank}")
            elif batch_ids[rank] == 0:
                peer.fail(f"cannot open a connection to {peer.address.segment} (peer down?)")
            else:
                peer.state = "probing"
        waiting = [p for p in peers if p.state == "probing"]
        delay = _POLL_MIN_S
        while waiting:
            for peer in list(waiting):
                status = self._te.transfer_check_status(batch_ids[peer.address.rank])
                if status == _COMPLETED:
                    peer.state, peer.reason = "open", ""
                elif status != _PENDING:
                    peer.fail(f"probe write to {peer.address.segment} failed (status {status})")
                    if status == _TIMED_OUT:
                        peer.orphans.append(_Orphan(batch_ids[peer.address.rank], "probe", None))
                if status != _PENDING:
                    waiting.remove(peer)
            if waiting and time.monotonic() >= deadline:
                for peer in waiting:
                    peer.orphans.append(_Orphan(batch_ids[peer.address.rank], "probe", None))
                    peer.fail("probe write did not complete before the deadline (peer hung?)")
                break
            delay = self._nap(delay)
        failed.update({p.address.rank: p.reason for p in peers if p.state != "open"})
        return failed

    # ------------------------------------------------------------------ data plane

    def _check_rank(self, rank, what: str) -> int:
        if self._closed:
            raise RuntimeError(f"Transport of rank {self.rank} is closed")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.num_ranks:
            raise ValueError(f"{what} must be a rank in [0, {self.num_ranks}), got {rank!r}")
        return int(rank)

    def _maybe_delay(self, seq: int):
        if self._delay_s and self._delayed_seq != seq:
            self._delayed_seq = seq
            time.sleep(self._delay_s)

    def _submit(self, peer: _Peer, local_ptr: int, remote_addr: int, nbytes: int, read: bool = False) -> int:
        te = self._te
        submit = te.batch_transfer_async_read if read else te.batch_transfer_async_write
        return submit(peer.address.segment, [local_ptr], [remote_addr], [nbytes])

    def _failed_handle(self, handle: SendHandle, reason: str, suspect: int | None = None) -> SendHandle:
        handle.state, handle.reason = SendHandle.FAILED, reason
        if suspect is not None:
            handle.suspect = suspect
        return handle

    def send(self, dest: int, arrays: Sequence[np.ndarray], seq: int) -> SendHandle:
        """Start sending `arrays` (numpy arrays: rows [C, H], metadata, a count...) to `dest` for
        exchange `seq`. Returns at once with a handle; `wait_sends`, `recv` and `exchange` drive it.

        A send to this rank itself is a local copy and completes immediately. Failures (peer down,
        fault injection, a still-pending earlier transfer to `dest`) come back as a failed handle, never
        as an exception; malformed input raises ValueError/PayloadError.
        """
        seq = check_seq(seq)
        dest = self._check_rank(dest, "dest")
        self._maybe_delay(seq)
        if dest == self.rank:
            handle = SendHandle(dest, seq)
            start = self.layout.slot_offset(self.rank, seq)
            pack_payload(self._recv[start:start + self.layout.slot_bytes], self.layout, seq, arrays)
            self._signals[self.rank, self.layout.buffer_index(seq)] = seq
            handle.state = SendHandle.DONE
            return handle
        peer = self._peers.get(dest)
        if peer is None:
            raise ValueError(f"no address installed for rank {dest}; call set_peers first")
        handle = SendHandle(dest, seq, peer)
        if self._drop:
            return self._failed_handle(handle, f"send dropped by fault injection (drop=True on rank {self.rank})",
                                       suspect=self.rank)
        self._advance_pending()
        self._poll_orphans()
        blocker = self._engine_blocker()
        if blocker is not None:
            return self._failed_handle(handle, f"Mooncake is blocked by a handshake with rank {blocker}", blocker)
        if peer.inflight is not None:
            raise RuntimeError(f"a send to rank {dest} for seq {peer.inflight.seq} is still in flight; "
                               "wait_sends (or exchange) before sending to it again")
        if peer.state != "open":
            return self._failed_handle(handle, peer.reason)
        if peer.orphans:
            return self._failed_handle(handle, f"an abandoned {peer.orphans[0].what} transfer to rank {dest} "
                                               "is still in flight (peer hung or overloaded)")
        used = pack_payload(peer.staging, self.layout, seq, arrays)
        remote = peer.address.recv_base + self.layout.slot_offset(self.rank, seq)
        handle.batch_id = self._submit(peer, int(peer.staging.ctypes.data), remote, used)
        if handle.batch_id == 0:
            peer.fail(f"cannot submit a write to {peer.address.segment} (peer down?)")
            return self._failed_handle(handle, peer.reason)
        peer.inflight = handle
        self._pending.append(handle)
        return handle

    def _finish(self, handle: SendHandle, reason: str | None = None):
        """Mark `handle` done (reason None) or failed; release its peer's staging slot."""
        handle.batch_id = 0
        if reason is None:
            handle.state = SendHandle.DONE
        else:
            self._failed_handle(handle, reason)
        handle._peer.inflight = None
        self._pending.remove(handle)

    def _advance(self, handle: SendHandle):
        status = self._te.transfer_check_status(handle.batch_id)
        if status == _PENDING:
            return
        peer = handle._peer
        phase = handle.state
        if status == _COMPLETED and phase == SendHandle.DATA:
            signal_word = peer.staging[self.layout.slot_bytes:self.layout.slot_bytes + 8]
            signal_word.view(np.uint64)[0] = handle.seq
            remote = peer.address.recv_base + self.layout.signal_offset(self.rank, handle.seq)
            handle.batch_id = self._submit(peer, int(signal_word.ctypes.data), remote, 8)
            handle.state = SendHandle.SIGNAL
            if handle.batch_id == 0:
                peer.fail(f"cannot submit the signal write to {peer.address.segment} (peer down?)")
                self._finish(handle, peer.reason)
        elif status == _COMPLETED:
            self._finish(handle)
        else:
            if status == _TIMED_OUT:  # Mooncake's slice timeout; the batch is not freed yet
                peer.orphans.append(_Orphan(handle.batch_id, phase, peer.staging))
            peer.fail(f"{phase} write to {peer.address.segment} failed (status {status}: peer down or rejected it)")
            self._finish(handle, peer.reason)

    def _advance_pending(self):
        for handle in list(self._pending):
            self._advance(handle)

    def _abandon(self, handle: SendHandle, reason: str, suspect_peer: bool):
        """Stop driving `handle`: keep its batch as an orphan; mark the peer failed if it is to blame."""
        peer = handle._peer
        peer.orphans.append(_Orphan(handle.batch_id, handle.state, peer.staging))
        if suspect_peer:
            peer.fail(reason)
        self._finish(handle, reason)

    def _poll_orphans(self):
        for peer in [*self._peers.values(), *self._retired]:
            for orphan in list(peer.orphans):
                status = self._te.transfer_check_status(orphan.batch_id)
                if status in (_COMPLETED, _FAILED):
                    peer.orphans.remove(orphan)
                    if status == _FAILED:
                        peer.fail(f"an abandoned {orphan.what} transfer to {peer.address.segment} failed")
        in_use = {id(p.staging) for p in self._peers.values()}
        for peer in self._retired:
            if not peer.orphans and id(peer.staging) not in in_use:
                self._unregister(peer.staging)
        self._retired = [p for p in self._retired if p.orphans]

    def _drain_orphans(self, peer: _Peer, deadline: float):
        delay = _POLL_MIN_S
        while peer.orphans and time.monotonic() < deadline:
            self._poll_orphans()
            delay = self._nap(delay)

    @staticmethod
    def _nap(delay: float) -> float:
        time.sleep(delay)
        return min(delay * 2, _POLL_MAX_S)

    def _progress(self, handles: Sequence[SendHandle], sources: Sequence[int], seq: int | None,
                  deadline: float, copy: bool, fail_fast: bool) -> ExchangeResult:
        """Drive every pending send and watch the signals of `sources` until `handles` are done and
        all sources arrived, the deadline passes, or (fail_fast) any failure is known."""
        result = ExchangeResult()
        waiting = list(dict.fromkeys(sources))
        buffer = self.layout.buffer_index(seq) if waiting else 0
        probes: dict[int, tuple[_Peer, int]] = {}
        next_probe = time.monotonic() + _PROBE_AFTER_S
        delay = _POLL_MIN_S
        try:
            while True:
                self._advance_pending()
                for handle in handles:
                    if handle.state == SendHandle.FAILED:
                        result.failed.setdefault(handle.suspect, handle.reason)
                for source in list(waiting):
                    if self._signals[source, buffer] == seq:
                        waiting.remove(source)
                        start = self.layout.slot_offset(source, seq)
                        try:
                            result.payloads[source] = unpack_payload(
                                self._recv[start:start + self.layout.slot_bytes], self.layout, seq, copy)
                        except PayloadError as e:
                            result.failed.setdefault(source, f"corrupt payload: {e}")
                now = time.monotonic()
                if waiting and (probes or now >= next_probe):
                    self._probe_silent(waiting, probes, result, submit=now >= next_probe)
                    next_probe = now + _PROBE_EVERY_S if now >= next_probe else next_probe
                unsent = [h for h in handles if not h.done]
                if not waiting and not unsent:
                    return result
                expired = now >= deadline
                if expired or (fail_fast and result.failed):
                    for handle in unsent:
                        why = (f"{handle.state} write for seq {handle.seq} not completed before the deadline"
                               if expired else f"abandoned at seq {handle.seq}: the exchange failed")
                        self._abandon(handle, why, suspect_peer=expired)
                        if expired:
                            result.failed.setdefault(handle.dest, why)
                    if expired:
                        for source in waiting:
                            if source not in result.failed:
                                result.failed[source] = f"no signal for seq {seq} before the deadline"
                                result.silent.add(source)
                    return result
                delay = self._nap(delay)
        finally:
            for peer, batch_id in probes.values():
                peer.orphans.append(_Orphan(batch_id, "probe", None))

    def _probe_silent(self, waiting: list[int], probes: dict, result: ExchangeResult, submit: bool):
        """Liveness probes of silent sources: an 8-byte write to their probe word, one in flight per
        source. A dead rank's write fails within milliseconds, so a rank killed after it received our
        data but before it signalled is named long before the deadline; a live one (even a slow one:
        Mooncake's own threads apply the write) completes it. A failed probe is direct evidence."""
        for source, (peer, batch_id) in list(probes.items()):
            status = self._te.transfer_check_status(batch_id)
            if status == _PENDING:
                continue
            del probes[source]
            if status != _COMPLETED:
                if status == _TIMED_OUT:
                    peer.orphans.append(_Orphan(batch_id, "probe", None))
                peer.fail(f"probe write to {peer.address.segment} failed while waiting for its signal "
                          f"(status {status}: peer down)")
                if source in waiting:
                    waiting.remove(source)
                    result.failed.setdefault(source, peer.reason)
        if not submit or self._engine_blocker() is not None:
            return
        for source in list(waiting):
            peer = self._peers.get(source)
            if source in probes or peer is None or peer.state != "open" or peer.orphans or source in result.failed:
                continue
            remote = peer.address.recv_base + self.layout.probe_offset(self.rank)
            batch_id = self._submit(peer, int(self._scratch.ctypes.data), remote, 8)
            if batch_id == 0:
                peer.fail(f"cannot submit a probe write to {peer.address.segment} (peer down?)")
                waiting.remove(source)
                result.failed.setdefault(source, peer.reason)
            else:
                probes[source] = (peer, batch_id)

    def _deadline(self, deadline: float | None) -> float:
        if deadline is None:
            return time.monotonic() + self.exchange_timeout
        if not isinstance(deadline, (int, float)):
            raise TypeError(f"deadline must be a time.monotonic() value, got {type(deadline).__name__}")
        return float(deadline)

    def _check_handles(self, handles) -> list[SendHandle]:
        handles = list(handles)
        for h in handles:
            if not isinstance(h, SendHandle):
                raise TypeError(f"expected SendHandle objects, got {type(h).__name__}")
        return handles

    def wait_sends(self, handles: Sequence[SendHandle], deadline: float | None = None) -> ExchangeResult:
        """Drive `handles` until all are done or `deadline` (time.monotonic(); default now +
        exchange_timeout). Failed and timed-out sends appear in `.failed`; never blocks past it."""
        return self._progress(self._check_handles(handles), (), None, self._deadline(deadline), False, False)

    def recv(self, sources: Sequence[int], seq: int, deadline: float | None = None,
             copy: bool = False) -> ExchangeResult:
        """Wait until every rank in `sources` has signalled `seq` or `deadline` passes.

        Payload arrays are views into the receive region unless `copy`: a view for seq s from source r
        stays intact until r writes seq s + buffers_per_source, which in a lockstep all-to-all (every
        rank waits for every other's seq s+1 before sending s+2) is after this rank sends seq s+1.
        Sends still in flight are driven while waiting, so their signals go out.
        """
        seq = check_seq(seq)
        sources = [self._check_rank(s, "source") for s in sources]
        self._maybe_delay(seq)
        return self._progress([], sources, seq, self._deadline(deadline), copy, False)

    def exchange(self, outgoing: Mapping[int, Sequence[np.ndarray]], seq: int, *,
                 sources: Sequence[int] | None = None, timeout: float | None = None,
                 copy: bool = False, fail_fast: bool = True) -> ExchangeResult:
        """Send `outgoing[dest]` to every dest and receive from `sources` (default: the dests), for
        `seq`, within `timeout` seconds (default exchange_timeout).

        With fail_fast (default) it returns as soon as any peer is known to have failed: the step is
        abandoned, its unfinished transfers are orphaned (a later send to such a peer fails until they
        resolve). Use `.raise_for_failures()` to turn failures into PeerFailure.
        """
        seq = check_seq(seq)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self._maybe_delay(seq)  # a slow rank is late to start; its own deadline runs from then
        deadline = time.monotonic() + (self.exchange_timeout if timeout is None else timeout)
        sources = sorted(outgoing) if sources is None else [self._check_rank(s, "source") for s in sources]
        handles = [self.send(dest, arrays, seq) for dest, arrays in sorted(outgoing.items())]
        return self._progress(handles, sources, seq, deadline, copy, fail_fast)

    # ------------------------------------------------------------------ native exchange access

    def engine_ptr(self) -> int:
        """Address of this rank's mooncake::TransferEngine (for runtime/exchange_ffi.py)."""
        self._check_rank(self.rank, "this rank")  # raises if closed
        return int(self._te.get_engine_ptr())

    @property
    def recv_region(self) -> np.ndarray:
        """This rank's registered receive region (uint8, `layout.region_bytes` long)."""
        return self._recv

    def peer_table(self) -> dict[int, tuple[PeerAddress, str, str]]:
        """rank -> (address, state, reason) of every installed peer (state as `peer_state`)."""
        return {rank: (peer.address, *self.peer_state(rank)) for rank, peer in self._peers.items()}

    def engine_blocker(self) -> int | None:
        """Rank whose stuck segment handshake holds Mooncake's engine lock, or None."""
        return self._engine_blocker()

    # ------------------------------------------------------------------ weights region

    def _local_span(self, array: np.ndarray, nbytes: int, what: str) -> int:
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
            raise ValueError(f"{what} must be a C-contiguous numpy array")
        if array.nbytes < nbytes:
            raise ValueError(f"{what} holds {array.nbytes} bytes, the transfer needs {nbytes}")
        ptr = int(array.ctypes.data)
        for region in self._registered:
            base = int(region.ctypes.data)
            if base <= ptr and ptr + nbytes <= base + region.nbytes:
                return ptr
        raise ValueError(f"{what} is not inside memory registered with this Transport: use a view of "
                         "`transport.weights` or an array passed to `register_array`")

    def _remote_weights(self, rank: int, offset: int, nbytes: int) -> tuple[_Peer, int]:
        rank = self._check_rank(rank, "peer")
        peer = self._peers.get(rank)
        if peer is None:
            raise ValueError(f"no address installed for rank {rank}; call set_peers first")
        size = peer.address.weights_nbytes
        if not isinstance(offset, (int, np.integer)) or not isinstance(nbytes, (int, np.integer)):
            raise TypeError("remote_offset and nbytes must be ints")
        if nbytes <= 0 or offset < 0 or offset + nbytes > size:
            raise ValueError(f"[{offset}, {offset + nbytes}) is outside rank {rank}'s weights region "
                             f"of {size} bytes (or empty)")
        return peer, peer.address.weights_base + int(offset)

    def _transfer_blocking(self, peer: _Peer, local: int, remote: int, nbytes: int, read: bool,
                           keepalive: np.ndarray, timeout: float | None):
        deadline = self._deadline(None if timeout is None else time.monotonic() + timeout)
        what = "read" if read else "write"
        rank = peer.address.rank
        self._poll_orphans()
        blocker = self._engine_blocker()
        if blocker is not None:
            raise PeerFailure([blocker], f"Mooncake is blocked by a handshake with rank {blocker}")
        if peer.state != "open":
            raise PeerFailure([rank], peer.reason)
        batch_id = self._submit(peer, local, remote, nbytes, read=read)
        if batch_id == 0:
            peer.fail(f"cannot submit a {what} to {peer.address.segment} (peer down?)")
            raise PeerFailure([rank], peer.reason)
        delay = _POLL_MIN_S
        while True:
            status = self._te.transfer_check_status(batch_id)
            if status == _COMPLETED:
                return
            if status != _PENDING or time.monotonic() >= deadline:
                if status in (_PENDING, _TIMED_OUT):
                    peer.orphans.append(_Orphan(batch_id, what, keepalive))
                reason = (f"{what} of {nbytes} bytes " +
                          ("failed" if status == _FAILED else "did not complete before the deadline"))
                peer.fail(reason)
                raise PeerFailure([rank], reason)
            delay = self._nap(delay)

    def read(self, peer: int, remote_offset: int, nbytes: int, into: np.ndarray, timeout: float | None = None):
        """Copy `nbytes` from `peer`'s weights region at `remote_offset` into `into` (a C-contiguous array
        inside registered memory, e.g. a view of `self.weights`). Raises PeerFailure on failure or after
        `timeout` seconds (default exchange_timeout); then `into` is undefined and may still change
        until the abandoned read resolves."""
        target, remote = self._remote_weights(peer, remote_offset, nbytes)
        local = self._local_span(into, nbytes, "into")
        self._transfer_blocking(target, local, remote, nbytes, True, into, timeout)

    def write(self, peer: int, remote_offset: int, src: np.ndarray, timeout: float | None = None):
        """Copy all of `src` (C-contiguous, inside registered memory) into `peer`'s weights region at
        `remote_offset`. Raises PeerFailure on failure or after `timeout` seconds."""
        nbytes = int(src.nbytes) if isinstance(src, np.ndarray) else 0
        target, remote = self._remote_weights(peer, remote_offset, nbytes)
        local = self._local_span(src, nbytes, "src")
        self._transfer_blocking(target, local, remote, nbytes, False, src, timeout)

    # ------------------------------------------------------------------ teardown

    def close(self, timeout: float = 2.0):
        """Stop the engine and release registered memory. Abandoned transfers are given up to
        `timeout` seconds to resolve first; past that the engine is torn down with them."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        delay = _POLL_MIN_S
        while (self.orphan_count or self._pending) and time.monotonic() < deadline:
            self._advance_pending()
            self._poll_orphans()
            delay = self._nap(delay)
        if self._opener is not None:
            self._opener.join(max(0.0, deadline - time.monotonic()))
            if self._opener.is_alive():
                # The helper thread is inside the engine: destroying it now would be a use-after-free.
                _LEAKED.append((self._te, self._registered))
                return
        for array in self._registered:
            self._te.unregister_memory(int(array.ctypes.data))
        self._te = None
        self._peers.clear()
        self._retired.clear()
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Engines whose handshake thread never returned; kept alive so process exit does not free them under it.
_LEAKED: list = []
