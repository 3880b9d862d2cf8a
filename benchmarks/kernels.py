"""Benchmark of the EP ops: FFI kernels against the pure-JAX reference.

First checks the FFI results against the reference on fresh random inputs (exact for dispatch and
regroup, float32 within 1e-6 relative / bfloat16 within its rounding for ungroup and combine), then
times both backends. Prints a table; --json FILE writes a list of rows (op, backend, T, K, H, N, S,
dtype, platform, ms, bytes, gbps).

Setup of one row: T tokens with K distinct slots each among N ranks x S slots; dispatch of x [T, H];
regroup and ungroup of the T-capacity rows sent to rank 0 (one source's share of what rank 0
receives); combine of the N returned buffers. Bytes are what an op must read and write: read rows
that are used, every written output (zero tails included), index arrays; GB/s = bytes / time.

    python benchmarks/kernels.py                      # CPU: T in 128 1024 4096, K=8, H=512, float32
    python benchmarks/kernels.py --hidden 7168 --dtype bfloat16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jax_elastic_moe.ep import ffi, ops  # noqa: E402

OPS = ("dispatch", "regroup", "ungroup", "combine")


def make_inputs(seed, t, k, n, s, h, dtype):
    """x [T, H], slots [T, K] (K distinct of N*S per token), weights [T, K], active [N] (all live)."""
    rng = np.random.default_rng(seed)
    slots = np.argsort(rng.random((t, n * s)), axis=1)[:, :k].astype(np.int32)
    x = jnp.asarray(rng.standard_normal((t, h)), dtype)
    weights = jnp.asarray(rng.random((t, k)), dtype)
    return x, jnp.asarray(slots), weights, jnp.ones((n,), jnp.int32)


def op_functions(n, s, t, backend):
    """op name -> jitted function of that op's array arguments."""
    return {
        "dispatch": jax.jit(lambda x, slots, w: ops.dispatch(x, slots, w, n, s, backend=backend)),
        "regroup": jax.jit(lambda rows, rs, rw: ops.regroup(rows, rs, rw, s, backend=backend)),
        "ungroup": jax.jit(lambda out, er, ew: ops.ungroup(out, er, ew, t, backend=backend)),
        "combine": jax.jit(lambda back, src, act: ops.combine(back, src, act, t, backend=backend)),
    }


def op_arguments(x, slots, weights, active, n, s):
    """The array arguments of each op, built with the reference (so both backends get the same)."""
    send_x, send_slot, send_w, counts, src = ops.dispatch(x, slots, weights, n, s, backend="jax")
    grouped, sizes, entry_row, entry_w = ops.regroup(send_x[0], send_slot[0], send_w[0], s, backend="jax")
    return {
        "dispatch": (x, slots, weights),
        "regroup": (send_x[0], send_slot[0], send_w[0]),
        "ungroup": (grouped, entry_row, entry_w),
        "combine": (send_x, src, active),
    }


def bytes_moved(op, args, outs):
    """Bytes an op must move: rows it reads that are used, all it writes, its index arrays."""
    nbytes = lambda a: int(a.size) * a.dtype.itemsize  # noqa: E731
    if op == "dispatch":
        x, slots, w = args
        return nbytes(x) + nbytes(slots) + nbytes(w) + sum(nbytes(o) for o in outs)
    if op == "regroup":
        rows, row_slot, row_w = args
        used = int((np.asarray(outs[2]) >= 0).sum())
        row = rows.shape[1] * rows.dtype.itemsize
        return used * row + nbytes(row_slot) + nbytes(row_w) + sum(nbytes(o) for o in outs)
    if op == "ungroup":
        entry_out, entry_row, entry_w = args
        used = int((np.asarray(entry_row) >= 0).sum())
        return used * entry_out.shape[1] * entry_out.dtype.itemsize + nbytes(entry_row) + nbytes(entry_w) + nbytes(outs)
    back, src, active = args
    used = int(((np.asarray(src) >= 0) & (np.asarray(active)[:, None] > 0)).sum())
    return used * back.shape[2] * back.dtype.itemsize + nbytes(src) + nbytes(active) + nbytes(outs)


def check_outputs(op, want, got, dtype):
    """Raises AssertionError with the op's name when the FFI result differs from the reference."""
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for i, (a, b) in enumerate(zip(want, got)):
        a, b = np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a), np.asarray(
            b.astype(jnp.float32) if b.dtype == jnp.bfloat16 else b)
        assert a.shape == b.shape, f"{op} output {i}: shape {b.shape} != {a.shape}"
        if op in ("dispatch", "regroup"):
            assert np.array_equal(a, b), f"{op} output {i}: differs from the reference"
        else:
            tol = 1e-6 if jnp.dtype(dtype) == jnp.float32 else 2.0 ** -7
            np.testing.assert_allclose(b, a, rtol=tol, atol=tol, err_msg=f"{op} output {i}")


def time_call(fn, args, min_time=0.2, repeats=5, window=8):
    """Median seconds per call. Calls are issued back to back (asynchronous dispatch hides the host's
    per-call cost) but at most `window` at a time, so in-flight buffers stay bounded."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - start, 1e-6)
    n = max(1, min(1000, int(min_time / once)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            out = fn(*args)
            if i % window == window - 1:
                jax.block_until_ready(out)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / n)
    return float(np.median(samples))


def check_case(seed, t, k, n, s, h, dtype, backend="ffi"):
    """FFI == reference for every op on fresh inputs of this shape."""
    x, slots, weights, active = make_inputs(seed, t, k, n, s, h, dtype)
    args = op_arguments(x, slots, weights, active, n, s)
    ref, fast = op_functions(n, s, t, "jax"), op_functions(n, s, t, backend)
    for op in OPS:
        check_outputs(op, ref[op](*args[op]), fast[op](*args[op]), dtype)


def benchmark(tokens, k, n, s, hidden, dtype, backends=("jax", "ffi"), seed=0, min_time=0.2):
    rows = []
    platform = jax.default_backend()
    for h in hidden:
        for t in tokens:
            check_case(seed + t + h, t, k, n, s, h, dtype)  # fresh inputs, not the timed ones
            x, slots, weights, active = make_inputs(seed, t, k, n, s, h, dtype)
            args = op_arguments(x, slots, weights, active, n, s)
            for backend in backends:
                fns = op_functions(n, s, t, backend)
                for op in OPS:
                    outs = fns[op](*args[op])
                    sec = time_call(fns[op], args[op], min_time=min_time)
                    moved = bytes_moved(op, args[op], outs)
                    rows.append(dict(op=op, backend=backend, T=t, K=k, H=h, N=n, S=s, dtype=jnp.dtype(dtype).name,
                                     platform=platform, ms=sec * 1e3, bytes=moved, gbps=moved / sec / 1e9))
    return rows


def format_table(rows):
    ref_ms = {(r["op"], r["T"], r["H"]): r["ms"] for r in rows if r["backend"] == "jax"}
    lines = [f"{'op':9} {'backend':7} {'T':>5} {'K':>2} {'H':>5} {'N':>3} {'S':>3} {'dtype':8} "
             f"{'ms':>9} {'MB':>8} {'GB/s':>7} {'vs jax':>7}"]
    for r in rows:
        base = ref_ms.get((r["op"], r["T"], r["H"]))
        speed = f"{base / r['ms']:6.1f}x" if base and r["backend"] != "jax" else ""
        lines.append(f"{r['op']:9} {r['backend']:7} {r['T']:5d} {r['K']:2d} {r['H']:5d} {r['N']:3d} {r['S']:3d} "
                     f"{r['dtype']:8} {r['ms']:9.3f} {r['bytes'] / 1e6:8.2f} {r['gbps']:7.2f} {speed:>7}")
    return "\n".join(lines)


def parse_args(argv=None):
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, nargs="+", default=[7168] if on_gpu else [512],
                   help="H (default 7168 on GPU, DeepSeek-V3; 512 on CPU)")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--slots", type=int, default=16, help="slots per rank")
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of calls per timing sample")
    p.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not ffi.available():
        sys.exit(ffi.missing_reason())
    rows = benchmark(args.tokens, args.topk, args.ranks, args.slots, args.hidden, jnp.dtype(args.dtype),
                     min_time=args.min_time)
    print(f"# {jax.default_backend()} {jax.devices()[0].device_kind}; jax {jax.__version__}; FFI == reference: ok")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
