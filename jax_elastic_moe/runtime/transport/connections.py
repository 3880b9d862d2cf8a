"""Connections of one rank's Transport: the Mooncake engine's registered memory, the peer table, and
the segment handshake (`set_peers`), which runs on a helper thread bounded by a deadline because a
hung peer's first contact blocks inside Mooncake for up to 60 s with the engine lock held."""
from __future__ import annotations

import threading
import time
from typing import Mapping

import numpy as np

from ..layout import aligned_buffer
from ..peers import PeerAddress, PeerFailure
from .common import _COMPLETED, _PENDING, _POLL_MIN_S, _TIMED_OUT, DEFAULT_CONNECT_TIMEOUT, _Orphan, _Peer, nap


class Connections:
    """The connection part of `Transport` (transport/endpoint.py sets up the state it uses: `_te`,
    `layout`, `rank`, `num_ranks`, `_registered`, `_recv`, `_weights`, `_scratch`, `_address`,
    `_peers`, `_retired`, `_segment_tokens`, `_opener`, `_opener_rank`, `_late_probes`)."""

    _nap = staticmethod(nap)

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
            if old is not None and old.address == address and old.blocking():
                self._drain_orphans(old, deadline)  # a re-admitted slow peer: its old writes first
            reuse = old is not None and not old.blocking() and known in (None, address.token)
            peer = _Peer(address, old.staging if reuse else self._new_staging())
            if reuse:
                peer.orphans = old.orphans      # probes only: still polled, so their ids are freed
            if old is not None and not reuse:
                self._retired.append(old)
            new_peers[rank] = peer
            if known is not None and known != address.token:
                # Mooncake caches segment descriptors by name for the life of the engine
                peer.fail(f"segment {address.segment} was used by an earlier incarnation of a rank; "
                          "Mooncake keeps its cached descriptor, so restart the rank on a new rpc port")
                failed[rank] = peer.reason
            elif old is not None and old.blocking():
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

    def _check_rank(self, rank, what: str) -> int:
        if self._closed:
            raise RuntimeError(f"Transport of rank {self.rank} is closed")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.num_ranks:
            raise ValueError(f"{what} must be a rank in [0, {self.num_ranks}), got {rank!r}")
        return int(rank)

    def _submit(self, peer: _Peer, local_ptr: int, remote_addr: int, nbytes: int, read: bool = False) -> int:
        te = self._te
        submit = te.batch_transfer_async_read if read else te.batch_transfer_async_write
        return submit(peer.address.segment, [local_ptr], [remote_addr], [nbytes])

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
