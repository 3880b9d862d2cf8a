"""Rank-side helpers of the native exchange's tests and benchmark, run in LoopbackCluster ranks with
`cluster.call(rank, "invoke", target="jax_elastic_moe.testing.exchange_check:<name>", ...)`.

Inputs are deterministic (`make_inputs(rank, step, ...)`), so every rank computes what it must
receive (`expected`) without asking anyone. Three ways to exchange them, all checked against that:
  python    Transport.exchange, as the worker's io_callback calls it (the reference)
  callback  the same inside a jitted function through io_callback (the old per-layer path)
  native    the jem_exchange FFI op inside a jitted function (runtime/exchange_ffi.py)
"""
from __future__ import annotations

import time
import zlib

import numpy as np

from ..runtime.exchange_ffi import NativeExchange

_DTYPES = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8, "float16": np.float16, "int64": np.int64}


def make_inputs(rank: int, step: int, num_ranks: int, tokens: int, spec, seed: int, counts: str = "random"):
    """Arrays [N, tokens, *tail] per (tail, dtype name) of `spec` and send counts [N] int32 of `rank`
    for `step`. counts: "random" (0..tokens), "full" (tokens) or "empty" (0)."""
    rng = np.random.default_rng([seed, rank, step])
    if counts == "random":
        send = rng.integers(0, tokens + 1, num_ranks).astype(np.int32)
    else:
        send = np.full(num_ranks, tokens if counts == "full" else 0, np.int32)
    arrays = []
    for tail, dtype in spec:
        shape = (num_ranks, tokens, *tail)
        arrays.append((rng.standard_normal(shape) * 100).astype(_DTYPES[dtype]))
    return arrays, send


def expected(rank: int, step: int, active, num_ranks: int, tokens: int, spec, seed: int, counts: str = "random"):
    """What `rank` receives for `step`: blocks by source, zeros past the rows sent; and the counts."""
    outs = [np.zeros((num_ranks, tokens, *tail), _DTYPES[dtype]) for tail, dtype in spec]
    got = np.zeros(num_ranks, np.int32)
    for src in range(num_ranks):
        if src != rank and not active[src]:
            continue
        arrays, send = make_inputs(src, step, num_ranks, tokens, spec, seed, counts)
        c = int(send[rank])
        got[src] = c
        for out, a in zip(outs, arrays):
            out[src, :c] = a[rank, :c]
    return outs, got


def reference_exchange(t, arrays, counts, active, seq: int, timeout: float):
    """The Python exchange of the worker (Transport.exchange with copies); (outs, recv_counts, result)."""
    peers = [r for r in range(t.num_ranks) if active[r] and r != t.rank]
    outgoing = {d: [a[d, :counts[d]] for a in arrays] for d in peers}
    result = t.exchange(outgoing, seq, sources=peers, timeout=timeout, copy=True)
    outs = [np.zeros_like(a) for a in arrays]
    got = np.zeros(t.num_ranks, np.int32)
    got[t.rank] = counts[t.rank]
    for out, a in zip(outs, arrays):
        out[t.rank, :counts[t.rank]] = a[t.rank, :counts[t.rank]]
    for src, payload in result.payloads.items():
        got[src] = payload[0].shape[0]
        for out, p in zip(outs, payload):
            out[src, :p.shape[0]] = p
    return outs, got, result


def start_native(t, timeout: float | None = None) -> bool:
    """Creates this rank's NativeExchange (for jax's default backend) and runs its self-test."""
    t._jem_native = NativeExchange(t, timeout)
    t._jem_native.self_test()
    t._jem_fns = {}
    return True


def install_native(t) -> dict:
    t._jem_native.install()
    return t._jem_native.peers()


def set_epoch(t, epoch: int) -> bool:
    """This rank's epoch, for both exchanges (the op's context where there is one)."""
    t.set_epoch(epoch)
    if getattr(t, "_jem_native", None) is not None:
        t._jem_native.set_epoch(epoch)
    return True


def stale_signals(t) -> dict:
    """Signals this rank dropped as stale: {"python": the Transport's, "native": the op's}."""
    native = getattr(t, "_jem_native", None)
    return {"python": t.stale_signals, "native": native.stale_signals() if native is not None else 0}


def native_state(t) -> dict:
    return {"orphans": t._jem_native.reclaim(), "peers": t._jem_native.peers()}


def _jitted(t, mode: str, timeout: float):
    import jax
    fn = t._jem_fns.get(mode) if hasattr(t, "_jem_fns") else None
    if fn is not None:
        return fn
    if mode == "native":
        native = t._jem_native

        def run(step, active, counts, *arrays):
            return native(arrays, counts, active, step, seq_stride=1, seq_offset=0)
    else:
        from jax.experimental import io_callback

        def host(step, active, counts, *arrays):
            outs, got, result = reference_exchange(t, [np.asarray(a) for a in arrays], np.asarray(counts),
                                                   np.asarray(active), int(step), timeout)
            if not result.ok:
                t._jem_failure = result
                raise RuntimeError(f"exchange failed: {result.failed}")
            return (*outs, got)

        def run(step, active, counts, *arrays):
            shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
            shapes.append(jax.ShapeDtypeStruct(counts.shape, counts.dtype))
            out = io_callback(host, shapes, step, active, counts, *arrays, ordered=True)
            return list(out[:-1]), out[-1]
    if not hasattr(t, "_jem_fns"):
        t._jem_fns = {}
    fn = t._jem_fns[mode] = jax.jit(run)
    return fn


def run(t, mode: str, first_step: int, steps: int, tokens: int, spec, seed: int = 0, active=None,
        timeout: float = 0.5, counts: str = "random", check: bool = True) -> dict:
    """Back-to-back exchanges with seq = step until one fails or `steps` are done. Without `check`
    (timing runs) every step sends the inputs of `first_step`, made and placed once, so the time
    between exchanges is only the loop's own.

    Returns latencies (s, the exchange call only: inputs are on the device before the clock starts),
    the steps whose received data differed from `expected`, digests of the last step's outputs, and on
    failure the reported ranks (failed: rank -> reason, silent) and the time it returned."""
    import jax
    spec = [(tuple(tail), dtype) for tail, dtype in spec]
    active = np.ones(t.num_ranks, np.int32) if active is None else np.asarray(active, np.int32)
    fn = None if mode == "python" else _jitted(t, mode, timeout)
    latencies, inner, bad, digests = [], [], [], None
    fixed = None if check else make_inputs(t.rank, first_step, t.num_ranks, tokens, spec, seed, counts)
    placed = None if fixed is None or fn is None else jax.device_put([active, fixed[1], *fixed[0]])
    for step in range(first_step, first_step + steps):
        arrays, send = fixed or make_inputs(t.rank, step, t.num_ranks, tokens, spec, seed, counts)
        failure = None
        if fn is not None:
            args = ([jax.device_put(np.int32(step)), *placed] if placed is not None else
                    jax.device_put([np.int32(step), active, send, *arrays]))
            jax.block_until_ready(args)
            start = time.monotonic()
            try:
                outs, got = jax.block_until_ready(fn(*args))
            except Exception as e:  # the op's ffi::Error (or the callback's exception)
                failure = t._jem_native.failure() if mode == "native" else getattr(t, "_jem_failure", None)
                if failure is None:
                    raise
                message = str(e)
        else:
            start = time.monotonic()
            outs, got, result = reference_exchange(t, arrays, send, active, step, timeout)
            failure = None if result.ok else result
            message = str(result.failed)
        end = time.monotonic()
        if failure is not None:
            return {"steps": len(latencies), "latencies": latencies, "bad": bad, "step": step,
                    "failed": dict(failure.failed), "silent": sorted(failure.silent), "t_detect": end,
                    "elapsed": end - start, "message": message[:2000]}
        latencies.append(end - start)
        if mode == "native":
            inner.append(t._jem_native.last_elapsed())
        if check:
            want, want_counts = expected(t.rank, step, active, t.num_ranks, tokens, spec, seed, counts)
            outs = [np.asarray(o) for o in outs]
            if not np.array_equal(np.asarray(got), want_counts) or not all(
                    np.array_equal(o, w) for o, w in zip(outs, want)):
                bad.append(step)
            digests = [zlib.crc32(np.ascontiguousarray(o).view(np.uint8).data) for o in outs]
    return {"steps": len(latencies), "latencies": latencies, "inner": inner, "bad": bad, "digests": digests, "failed": {},
            "silent": [], "t_detect": None}
