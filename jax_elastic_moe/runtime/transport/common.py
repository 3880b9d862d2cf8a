"""State shared by the transport's parts: defaults, Mooncake's status codes, one send in flight
(`SendHandle`), an abandoned transfer (`_Orphan`), and one remote rank's connection (`_Peer`)."""
from __future__ import annotations

import time

import numpy as np

from ..peers import PeerAddress

DEFAULT_EXCHANGE_TIMEOUT = 0.5
DEFAULT_CONNECT_TIMEOUT = 5.0
_POLL_MIN_S = 20e-6
_POLL_MAX_S = 1e-3
_PROBE_AFTER_S = 0.02  # a source silent this long into a wait gets liveness probes ...
_PROBE_EVERY_S = 0.05  # ... at most this often
# transfer_check_status codes (mooncake-integration/transfer_engine/transfer_engine_py.cpp)
_PENDING, _COMPLETED, _FAILED, _TIMED_OUT = 0, 1, -1, -2


def nap(delay: float) -> float:
    """Sleep `delay` seconds; returns the next poll's delay (doubling up to _POLL_MAX_S)."""
    time.sleep(delay)
    return min(delay * 2, _POLL_MAX_S)


class SendHandle:
    """One send in flight: its data write, then its signal write. Driven by the Transport."""

    DATA, SIGNAL, DONE, FAILED = "data", "signal", "done", "failed"
    __slots__ = ("dest", "seq", "state", "batch_id", "reason", "suspect", "_peer")

    def __init__(self, dest: int, seq: int, peer=None):
        self.dest, self.seq, self._peer = dest, seq, peer
        self.state, self.batch_id, self.reason, self.suspect = self.DATA, 0, "", dest

    def fail(self, reason: str, suspect: int | None = None) -> "SendHandle":
        """Mark this send failed (`suspect`: the rank to blame, default its dest); returns it."""
        self.state, self.reason = self.FAILED, reason
        if suspect is not None:
            self.suspect = suspect
        return self

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

    def blocking(self) -> _Orphan | None:
        """The first orphan that blocks new data to this peer: a data or signal write (it may still
        read the staging block, or land after newer data). A probe writes its own word: it blocks
        nothing."""
        return next((o for o in self.orphans if o.what != "probe"), None)

    def fail(self, reason: str):
        if self.state != "failed":
            self.state, self.reason = "failed", reason

