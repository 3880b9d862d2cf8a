"""Sends of one rank's Transport: the per-send state machine (data write, then signal write), and
the orphans: transfers abandoned at a deadline, polled until Mooncake resolves them so their batch
descriptors are freed and the buffers they read are not reused meanwhile."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..layout import check_seq, pack_payload
from ..peers import ExchangeResult
from .common import _COMPLETED, _FAILED, _PENDING, _POLL_MIN_S, _TIMED_OUT, SendHandle, _Orphan, _Peer


class Transfers:
    """The send and orphan part of `Transport` (state: `_pending`, and each `_Peer`'s `inflight`,
    `staging` and `orphans`)."""

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

    def send(self, dest: int, arrays: Sequence[np.ndarray], seq: int) -> SendHandle:
        """Start sending `arrays` (numpy arrays: rows [C, H], metadata, a count...) to `dest` for
        exchange `seq`. Returns at once with a handle; `wait_sends`, `recv` and `exchange` drive it.

        A send to this rank itself is a local copy and completes immediately. Failures (peer down,
        a still-pending earlier transfer to `dest`) come back as a failed handle, never
        as an exception; malformed input raises ValueError/PayloadError.
        """
        seq = check_seq(seq)
        dest = self._check_rank(dest, "dest")
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
        self._advance_pending()
        self._poll_orphans()
        blocker = self._engine_blocker()
        if blocker is not None:
            return handle.fail(f"Mooncake is blocked by a handshake with rank {blocker}", blocker)
        if peer.inflight is not None:
            raise RuntimeError(f"a send to rank {dest} for seq {peer.inflight.seq} is still in flight; "
                               "wait_sends (or exchange) before sending to it again")
        if peer.state != "open":
            return handle.fail(peer.reason)
        if (orphan := peer.blocking()) is not None:
            return handle.fail(f"an abandoned {orphan.what} transfer to rank {dest} "
                               "is still in flight (peer hung or overloaded)")
        used = pack_payload(peer.staging, self.layout, seq, arrays)
        remote = peer.address.recv_base + self.layout.slot_offset(self.rank, seq)
        handle.batch_id = self._submit(peer, int(peer.staging.ctypes.data), remote, used)
        if handle.batch_id == 0:
            peer.fail(f"cannot submit a write to {peer.address.segment} (peer down?)")
            return handle.fail(peer.reason)
        peer.inflight = handle
        self._pending.append(handle)
        return handle

    def _finish(self, handle: SendHandle, reason: str | None = None):
        """Mark `handle` done (reason None) or failed; release its peer's staging slot."""
        handle.batch_id = 0
        if reason is None:
            handle.state = SendHandle.DONE
        else:
            handle.fail(reason)
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
        while peer.blocking() and time.monotonic() < deadline:
            self._poll_orphans()
            delay = self._nap(delay)


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
