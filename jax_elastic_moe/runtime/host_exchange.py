"""The model's token exchange through the Python Transport: the fallback of a worker whose C++ op
(jem_exchange, runtime/exchange_ffi.py) cannot be used with the installed Mooncake. The jitted step
calls it through io_callback at every MoE layer, twice (dispatch, then combine)."""
from __future__ import annotations

from functools import partial

import numpy as np


class HostExchange:
    """One rank's exchange over `transport` for a model of `num_moe_layers` MoE layers; `peers` (the
    other live ranks) is set at every epoch. The failed exchange that made a step raise is kept in
    `failure` (an ExchangeResult) for the worker's report."""

    def __init__(self, transport, num_moe_layers: int):
        self.transport, self.num_moe_layers = transport, num_moe_layers
        self.peers: list[int] = []
        self.failure = None
        self._sent = self._received = None

    def __call__(self, moe_layer: int, phase: int, step, *arrays):
        """Phase 0: arrays = send rows [N, T, H], local slots [N, T, K], weights [N, T, K]; sends
        row block d to rank d, returns the blocks received from every source. Phase 1: rows [N, T, H]
        go back to the ranks they came from. Raises (abandoning the step) when a peer fails."""
        rank = self.transport.rank
        arrays = [np.asarray(a) for a in arrays]
        n, _ = arrays[0].shape[:2]
        seq = int(step) * (2 * self.num_moe_layers) + 2 * moe_layer + phase + 1
        peers = self.peers
        if phase == 0:
            counts = (arrays[1] >= 0).any(-1).sum(-1)
            self._sent = counts
            outgoing = {d: [a[d, :counts[d]] for a in arrays] for d in peers}
        else:
            outgoing = {d: [arrays[0][d, :self._received[d]]] for d in peers}
        result = self.transport.exchange(outgoing, seq, sources=peers, copy=True)
        if not result.ok:
            self.failure = result
            raise RuntimeError(f"exchange {seq} failed: {result.failed}")
        out = [np.zeros_like(a) for a in arrays]
        if phase == 0:
            out[1][:] = -1
            self._received = np.zeros(n, np.int64)
            self._received[rank] = self._sent[rank]
        for i, a in enumerate(arrays):
            out[i][rank] = a[rank]
        for src in peers:
            got = result.payloads[src]
            c = got[0].shape[0]
            if phase == 0:
                self._received[src] = c
            for i, g in enumerate(got):
                out[i][src, :c] = g
        return tuple(out)

    def model_exchange(self, step):
        """The exchange function make_step calls (arrays, moe_layer, phase) -> arrays, for `step`."""
        import jax
        import jax.experimental  # noqa: F401  (io_callback)

        def exchange(arrays, moe_layer, phase):
            shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)
            return list(jax.experimental.io_callback(partial(self, moe_layer, phase), shapes, step, *arrays,
                                                     ordered=True))
        return exchange
