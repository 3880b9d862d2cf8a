"""GPU check of the CUDA kernels, on a machine with no network and nothing installed but jax.

Loads the prebuilt plain CUDA library (ctypes; any Python), then:
  1. the test suite (tests/test_ep_ops.py, tests/test_grouped_matmul.py) on the GPU, if pytest and
     hypothesis are importable: CUDA kernels against the reference, Mosaic ragged_dot against ragged_dot;
  2. FFI == reference at full size (H=7168 bfloat16, and float32), also with custom calls captured
     in CUDA graphs (command buffers), in a subprocess with XLA_FLAGS set for that;
  3. the card's copy bandwidth (an XLA read + write pass over 1 GiB);
  4. the kernel benchmark of benchmarks/kernels.py (T in 128 1024 4096, K=8, H=7168, bfloat16);
     target: dispatch + combine at T=4096 move their bytes at >= 50% of the copy bandwidth;
  5. the MoE layer of one rank end to end (T=4096, K=8, 16 local slots, DeepSeek-V3 experts H=7168,
     I=2048, bfloat16): FFI dispatch/regroup + grouped matmul (Mosaic GPU on Hopper) + FFI
     ungroup/combine against the pure-JAX layer (sort + take + lax.ragged_dot + scatter-add);
     target: >= 8x faster, same result within bfloat16 rounding;
  6. jem_exchange with its operands in GPU memory (csrc/cuda/exchange.cu, pinned-host staging), 2 rank
     processes over loopback TCP: results equal what each rank must receive; its latency beside the
     CPU op's. Needs Mooncake and the built _exchange_cuda module; skipped (and said so) otherwise.

    python benchmarks/gpu_check.py --so prebuilt/libjem_ffi_cuda.so --json gpu_check.json

Without --so the library is looked for at prebuilt/libjem_ffi_cuda.so, then build/*/ffi/. Exit code
0 when every check and target passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernels  # noqa: E402
from jax_elastic_moe.ep import ffi, grouped_matmul, ops, reference  # noqa: E402

# Custom calls captured in command buffers (CUDA graphs), even tiny graphs; the second set for an XLA
# that no longer knows the min-size flag.
GRAPH_FLAGS = ("--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1",
               "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL")


def find_library(explicit):
    candidates = [explicit] if explicit else [os.path.join(ROOT, "prebuilt", "libjem_ffi_cuda.so"),
                                              *sorted(glob.glob(os.path.join(ROOT, "build", "*", "ffi",
                                                                             "libjem_ffi_cuda.so")))]
    for path in candidates:
        if path and os.path.exists(path):
            return os.path.abspath(path)
    sys.exit(f"libjem_ffi_cuda.so not found (tried {candidates}); pass --so PATH")


def report(results, name, ok, detail):
    results.append(dict(check=name, ok=bool(ok), detail=detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def run_tests(lib, results):
    try:
        import hypothesis  # noqa: F401
        import pytest  # noqa: F401
    except ImportError as e:
        report(results, "test suite on GPU", True, f"skipped: {e}")
        return
    env = dict(os.environ, JEM_FFI_CUDA_LIBRARY=lib, JEM_FUZZ_EXAMPLES="8",  # GPU compiles are slower
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ep_ops.py",
           "tests/test_grouped_matmul.py"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
    print("\n".join("    " + line for line in tail))
    report(results, "test suite on GPU", proc.returncode == 0, tail[-1] if tail else "no output")


def full_size_correctness(results):
    for t, h, dtype in ((4096, 7168, jnp.bfloat16), (1024, 7168, jnp.float32), (0, 7168, jnp.bfloat16),
                        (333, 7, jnp.bfloat16), (257, 100, jnp.float32)):  # odd rows: narrow vectors
        try:
            kernels.check_case(7, t, 8, 8, 16, h, dtype)
            report(results, f"FFI == reference T={t} H={h} {jnp.dtype(dtype).name}", True, "ok")
        except AssertionError as e:
            report(results, f"FFI == reference T={t} H={h} {jnp.dtype(dtype).name}", False, str(e)[:300])


def graph_correctness(lib, results):
    """The same checks in a fresh process whose XLA captures custom calls in command buffers."""
    code = ("import sys; sys.path[:0] = [%r, %r]; import kernels, jax.numpy as jnp; "
            "kernels.check_case(3, 1024, 8, 8, 16, 7168, jnp.bfloat16); "
            "kernels.check_case(4, 64, 8, 4, 16, 256, jnp.float32); print('graphs ok')"
            % (ROOT, os.path.join(ROOT, "benchmarks")))
    for flags in GRAPH_FLAGS:
        env = dict(os.environ, JEM_FFI_CUDA_LIBRARY=lib, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags))
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        out = (proc.stdout + proc.stderr).strip().splitlines()
        if "nknown flag" not in proc.stderr:
            break
    report(results, "FFI == reference with command buffers", proc.returncode == 0 and "graphs ok" in proc.stdout,
           f"XLA_FLAGS={flags}: " + (out[-1] if out else "no output"))


def copy_bandwidth():
    a = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB, read once and written once per call
    sec = kernels.time_call(jax.jit(lambda v: -v), (a,))
    return 2 * a.nbytes / sec / 1e9


def kernel_benchmark(results, copy_gbps, tokens):
    rows = kernels.benchmark(tokens, 8, 8, 16, [7168], jnp.bfloat16)
    print(kernels.format_table(rows))
    t = max(tokens)
    pick = {r["op"]: r for r in rows if r["backend"] == "ffi" and r["T"] == t}
    moved = pick["dispatch"]["bytes"] + pick["combine"]["bytes"]
    ms = pick["dispatch"]["ms"] + pick["combine"]["ms"]
    gbps = moved / ms / 1e6
    report(results, f"dispatch + combine bandwidth (T={t}, H=7168, bf16, N=8)", gbps >= 0.5 * copy_gbps,
           f"{gbps:.0f} GB/s = {100 * gbps / copy_gbps:.0f}% of copy {copy_gbps:.0f} GB/s (target >= 50%)")
    return rows


def make_layer(t, k, s, h, i, seed=0):
    rng = np.random.default_rng(seed)
    slots = np.argsort(rng.random((t, s)), axis=1)[:, :k].astype(np.int32)
    weights = rng.random((t, k)).astype(np.float32)
    weights /= weights.sum(1, keepdims=True)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    key = jax.random.key(seed)
    kg, ku, kd = jax.random.split(key, 3)
    w_gate = (jax.random.normal(kg, (s, h, i), jnp.float32) / np.sqrt(h)).astype(jnp.bfloat16)
    w_up = (jax.random.normal(ku, (s, h, i), jnp.float32) / np.sqrt(h)).astype(jnp.bfloat16)
    w_down = (jax.random.normal(kd, (s, i, h), jnp.float32) / np.sqrt(i)).astype(jnp.bfloat16)
    return x, jnp.asarray(slots), jnp.asarray(weights, jnp.bfloat16), w_gate, w_up, w_down


def moe_layer(x, slots, weights, w_gate, w_up, w_down, *, slots_per_rank, backend, experts):
    """One rank's MoE layer, no exchange (one rank): dispatch, regroup, experts, ungroup, combine."""
    t = x.shape[0]
    send_x, send_slot, send_w, _, src = ops.dispatch(x, slots, weights, 1, slots_per_rank, backend=backend)
    grouped, sizes, entry_row, entry_w = ops.regroup(send_x[0], send_slot[0], send_w[0], slots_per_rank,
                                                     backend=backend)
    y = experts(grouped, sizes, w_gate, w_up, w_down)
    back = ops.ungroup(y, entry_row, entry_w, t, backend=backend)[None]
    return ops.combine(back, src, jnp.ones((1,), jnp.int32), t, backend=backend)


def layer_check(results, t=4096, k=8, s=16, h=7168, i=2048):
    x, slots, weights, w_gate, w_up, w_down = make_layer(t, k, s, h, i)
    w_gate_up = jnp.concatenate([w_gate, w_up], axis=-1)
    for shape in ((t * k, h, 2 * i), (t * k, h, i), (t * k, i, h)):  # pick tiles outside of any trace
        config = grouped_matmul.choose_config(*shape, s, "bfloat16")
        print(f"    ragged_dot_mgpu config for M,K,N={shape}: {config}")
        for rejected, why in grouped_matmul.rejected.get((*shape, s, "bfloat16"), []):
            print(f"      rejected {rejected}: {why[:300]}")
    fast_mlp = lambda g, n, wg, wu, wd: grouped_matmul.expert_mlp(g, n, wg, wu, wd, zero_tail=False)  # noqa: E731
    variants = {
        "pure-JAX (sort+take+ragged_dot+scatter)": (jax.jit(lambda *a: moe_layer(
            *a, slots_per_rank=s, backend="jax", experts=reference.expert_mlp)), (w_gate, w_up, w_down)),
        "FFI + grouped_matmul (gate, up separate)": (jax.jit(lambda *a: moe_layer(
            *a, slots_per_rank=s, backend="ffi", experts=fast_mlp)), (w_gate, w_up, w_down)),
        "FFI + grouped_matmul (gate|up fused)": (jax.jit(lambda xx, sl, ww, wgu, _, wd: moe_layer(
            xx, sl, ww, wgu, None, wd, slots_per_rank=s, backend="ffi", experts=fast_mlp)),
            (w_gate_up, w_gate_up, w_down)),
    }
    rows, outs = [], {}
    flops = 2 * t * k * h * i * 3
    for name, (fn, w) in variants.items():
        args = (x, slots, weights) + w
        outs[name] = np.asarray(fn(*args), np.float32)
        sec = kernels.time_call(fn, args, min_time=0.5, repeats=3)
        rows.append(dict(op="moe_layer", variant=name, T=t, K=k, S=s, H=h, I=i, ms=sec * 1e3,
                         tflops=flops / sec / 1e12))
        print(f"    {name:42s} {sec * 1e3:9.3f} ms  {flops / sec / 1e12:7.1f} TFLOP/s", flush=True)
    base_name = next(iter(variants))
    base = outs[base_name]
    base_ms = rows[0]["ms"]
    for row in rows[1:]:
        err = float(np.linalg.norm(outs[row["variant"]] - base) / np.linalg.norm(base))
        row["rel_err_vs_pure_jax"] = err
        row["speedup_vs_pure_jax"] = base_ms / row["ms"]
        report(results, f"MoE layer result: {row['variant']}", err < 2e-2, f"relative error {err:.2e} (< 2e-2)")
    best = max(rows[1:], key=lambda r: r["speedup_vs_pure_jax"])
    report(results, "MoE layer speed (best FFI variant)", best["speedup_vs_pure_jax"] >= 8,
           f"{best['variant']}: {best['ms']:.2f} ms vs {base_ms:.2f} ms = {best['speedup_vs_pure_jax']:.1f}x "
           f"(target >= 8x)")
    return rows


def exchange_check(results, ranks=2, tokens=64, row_bytes=4096, steps=200):
    """6. the CUDA exchange op against the data each rank must receive, and its latency."""
    try:
        import mooncake.engine  # noqa: F401

        from jax_elastic_moe.runtime import exchange_ffi
        exchange_ffi.load("CUDA")
    except Exception as e:  # noqa: BLE001 - any reason it cannot run here is reported
        report(results, "exchange (CUDA): skipped", True, f"{type(e).__name__}: {e}")
        print(f"    exchange (CUDA) skipped: {e}", flush=True)
        return None
    from jax_elastic_moe.testing.loopback import LoopbackCluster
    check = "jax_elastic_moe.testing.exchange_check:"
    out = {}
    for platform in ("cuda", "cpu"):
        env = {"JAX_PLATFORMS": platform, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.05", "MC_LOG_LEVEL": "ERROR"}
        with LoopbackCluster(ranks, max_rows=tokens, row_bytes=row_bytes, env=env) as cluster:
            all_ranks = list(range(ranks))
            cluster.install_peers()
            cluster.call_all(all_ranks, "invoke", wait=120, target=check + "start_native")
            cluster.call_all(all_ranks, "invoke", wait=60, target=check + "install_native")
            res = cluster.call_all(all_ranks, "invoke", wait=600, target=check + "run", mode="native", first_step=1,
                                   steps=steps, tokens=tokens, spec=[((row_bytes // 4,), "float32"), ((8,), "int32")])
        lat = sorted(x for r in res.values() for x in r["latencies"][20:])
        out[platform] = dict(ok=all(not r["bad"] and not r["failed"] for r in res.values()),
                             p50_ms=1e3 * lat[len(lat) // 2] if lat else None,
                             p99_ms=1e3 * lat[int(0.99 * len(lat))] if lat else None,
                             failed={k: r["failed"] for k, r in res.items() if r["failed"]})
        print(f"    exchange ({platform}): {out[platform]}", flush=True)
    report(results, "exchange (CUDA, pinned-host staging) == expected", out["cuda"]["ok"], out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--so", help="path of libjem_ffi_cuda.so (default: prebuilt/, then build/*/ffi/)")
    p.add_argument("--json", metavar="FILE", help="write checks and timings as JSON")
    p.add_argument("--skip-tests", action="store_true", help="skip the pytest run")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 4096])
    args = p.parse_args()

    lib = find_library(args.so)
    if jax.default_backend() != "gpu":
        sys.exit(f"no GPU: jax's default backend is {jax.default_backend()}")
    if not ffi.available("CUDA"):
        ffi.load_library(lib, "CUDA")
    dev = jax.devices()[0]
    print(f"# {dev.device_kind} (compute capability {getattr(dev, 'compute_capability', '?')}); jax {jax.__version__}; "
          f"Python {sys.version.split()[0]}; kernels from {ffi.loaded_from('CUDA')}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    results = []
    if not args.skip_tests:
        run_tests(lib, results)
    full_size_correctness(results)
    graph_correctness(lib, results)
    copy_gbps = copy_bandwidth()
    print(f"    copy bandwidth (XLA read + write of 1 GiB): {copy_gbps:.0f} GB/s", flush=True)
    kernel_rows = kernel_benchmark(results, copy_gbps, args.tokens)
    layer_rows = layer_check(results)
    exchange = exchange_check(results)
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"# {len(results) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, copy_gbps=copy_gbps, checks=results,
                           kernels=kernel_rows, layer=layer_rows, exchange=exchange), f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
