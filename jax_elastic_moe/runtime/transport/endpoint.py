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

The class is put together from focused parts: connections.py (registered memory, peer table,
handshake), transfers.py (sends and orphans), liveness.py (receiving, probes, exchange), weights.py
(weight reads and writes); fault injection wraps it (faults.py).

Not thread-safe: one thread (the rank's main loop) drives a Transport.
"""
from __future__ import annotations

import os
import secrets
import threading
import time

import numpy as np

from ..layout import RegionLayout, aligned_buffer
from ..peers import PeerAddress
from .common import _POLL_MIN_S, DEFAULT_EXCHANGE_TIMEOUT, SendHandle, _Peer
from .connections import Connections
from .liveness import Liveness
from .transfers import Transfers
from .weights import Weights


class Transport(Weights, Liveness, Transfers, Connections):
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

    Fault injection (drop, delay) is not in here: `FaultInjectingTransport` (faults.py) wraps it.
    """

    def __init__(self, rank: int, num_ranks: int, max_rows: int, row_bytes: int, meta_bytes: int, *,
                 host: str = "127.0.0.1", protocol: str = "tcp", device_name: str = "",
                 weights_bytes: int = 0, buffers_per_source: int = 2,
                 exchange_timeout: float = DEFAULT_EXCHANGE_TIMEOUT, stall_timeout_s: int | None = 5):
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
        self.epoch, self.stale_signals = 0, 0    # fencing: see Liveness.set_epoch
        self._seen = np.zeros_like(self._signals)
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
