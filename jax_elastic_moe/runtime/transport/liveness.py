"""Receiving for one rank's Transport: waiting for peers' signals while driving sends, with liveness
probes of silent sources (an 8-byte write that a dead rank fails within milliseconds), and the
all-to-all `exchange` built on `send` and that wait."""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from ..layout import EPOCH_SHIFT, PayloadError, check_seq, unpack_payload, with_epoch
from ..peers import ExchangeResult
from .common import (_COMPLETED, _PENDING, _POLL_MIN_S, _PROBE_AFTER_S, _PROBE_EVERY_S, _TIMED_OUT, SendHandle,
                     _Orphan, _Peer)


class Liveness:
    """The receive part of `Transport`: `recv`, `exchange` and the wait both run."""

    def set_epoch(self, epoch: int):
        """The epoch `exchange` tags every seq with (layout.with_epoch) and accepts from now on: a
        signal of another epoch, or from a rank not among the exchange's sources, is dropped and
        counted in `stale_signals` (a rank fenced out of an epoch is never counted in a later one)."""
        with_epoch(1, epoch)            # checks the range
        self.epoch = int(epoch)

    def _scan_stale(self, live: set):
        """Counts the signal words written since the last scan by a rank not in `live` or in another
        epoch than this rank's."""
        changed = self._signals != self._seen
        changed[self.rank] = False
        for source, buffer in zip(*np.nonzero(changed)):
            value = int(self._signals[source, buffer])
            self._seen[source, buffer] = value
            if int(source) not in live or value >> EPOCH_SHIFT != self.epoch:
                self.stale_signals += 1

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
        return self._progress([], sources, seq, self._deadline(deadline), copy, False)

    def exchange(self, outgoing: Mapping[int, Sequence[np.ndarray]], seq: int, *,
                 sources: Sequence[int] | None = None, timeout: float | None = None,
                 copy: bool = False, fail_fast: bool = True) -> ExchangeResult:
        """Send `outgoing[dest]` to every dest and receive from `sources` (default: the dests), for
        `seq`, within `timeout` seconds (default exchange_timeout). After set_epoch(e) with e > 0 the
        seq on the wire is with_epoch(seq, e), and only that is accepted.

        With fail_fast (default) it returns as soon as any peer is known to have failed: the step is
        abandoned, its unfinished transfers are orphaned (a later send to such a peer fails until they
        resolve). Use `.raise_for_failures()` to turn failures into PeerFailure.
        """
        seq = check_seq(seq)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        deadline = time.monotonic() + (self.exchange_timeout if timeout is None else timeout)
        sources = sorted(outgoing) if sources is None else [self._check_rank(s, "source") for s in sources]
        if self.epoch:
            seq = with_epoch(seq, self.epoch)
        live = set(sources)
        self._scan_stale(live)
        handles = [self.send(dest, arrays, seq) for dest, arrays in sorted(outgoing.items())]
        try:
            return self._progress(handles, sources, seq, deadline, copy, fail_fast)
        finally:
            self._scan_stale(live)
