"""The experts' SwiGLU on the CPU: the native kernel jem_grouped_matmul against jax.lax.ragged_dot.

  python benchmarks/grouped_matmul_cpu.py [--json out.json]

For each shape (M rows, H hidden, I intermediate) and S slots, half of the M rows are routed, spread
over 4 of the slots (the others idle, as redundant slots often are); time of one jitted expert_mlp
(3 grouped matmuls), median of repeats, and the FLOP rate over the routed rows."""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_elastic_moe.ep import grouped_matmul as gm

SHAPES = [(64, 256, 128), (256, 256, 128), (1024, 256, 128), (512, 1024, 512)]


def time_mlp(m, h, i, slots, impl, repeats):
    rng = np.random.default_rng(0)
    sizes = np.zeros(slots, np.int32)
    sizes[:4] = (m // 2) // 4
    x = jnp.asarray(rng.standard_normal((m, h)), jnp.float32)
    w_gate, w_up = (jnp.asarray(rng.standard_normal((slots, h, i)) / np.sqrt(h), jnp.float32) for _ in range(2))
    w_down = jnp.asarray(rng.standard_normal((slots, i, h)) / np.sqrt(i), jnp.float32)
    f = jax.jit(lambda *a: gm.expert_mlp(a[0], a[4], a[1], a[2], a[3], impl=impl))
    args = (x, w_gate, w_up, w_down, jnp.asarray(sizes))
    out = f(*args).block_until_ready()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args).block_until_ready()
        samples.append(time.perf_counter() - t)
    return float(np.median(samples)), np.asarray(out), int(sizes.sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    print(f"{'M':>5} {'H':>5} {'I':>5} {'S':>3} {'ragged_dot ms':>14} {'kernel ms':>10} {'speed-up':>9} "
          f"{'kernel GFLOP/s':>15} {'max |diff|':>11}")
    for m, h, i in SHAPES:
        for slots in (4, 5, 8):
            t_ref, ref, routed = time_mlp(m, h, i, slots, "jax", args.repeats)
            t_ffi, got, _ = time_mlp(m, h, i, slots, "ffi", args.repeats)
            gflops = 2 * 3 * routed * h * i / t_ffi / 1e9
            diff = float(np.abs(got - ref).max())
            rows.append(dict(m=m, h=h, i=i, slots=slots, routed_rows=routed, ragged_dot_s=t_ref, kernel_s=t_ffi,
                             speedup=t_ref / t_ffi, kernel_gflops=gflops, max_abs_diff=diff))
            print(f"{m:>5} {h:>5} {i:>5} {slots:>3} {t_ref * 1e3:>14.3f} {t_ffi * 1e3:>10.3f} "
                  f"{t_ref / t_ffi:>8.1f}x {gflops:>15.1f} {diff:>11.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.platform(), "processor": platform.processor(), "jax": jax.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
