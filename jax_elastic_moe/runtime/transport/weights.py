"""Weight reads and writes of one rank's Transport: one-sided copies between registered local
memory and a peer's weights region, each bounded by a deadline (an unfinished one is orphaned)."""
from __future__ import annotations

import time

import numpy as np

from ..peers import PeerFailure
from .common import _COMPLETED, _FAILED, _PENDING, _POLL_MIN_S, _TIMED_OUT, _Orphan, _Peer


class Weights:
    """The weights-region part of `Transport`."""

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
