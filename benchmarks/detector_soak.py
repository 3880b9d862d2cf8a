"""Heartbeat detector soak: no false suspicion under steady load with the default timings.

    python3 benchmarks/detector_soak.py                 # 120 s, 4 workers compiling JAX programs
    python3 benchmarks/detector_soak.py --seconds 30 --spinners 2

The controller side (this process) runs a HeartbeatMonitor with the defaults (interval 0.2 s, timeout
3 s). Each worker process runs a HeartbeatSender thread while its main thread compiles a stream of
fresh XLA programs with jax.jit (tracing holds the GIL, compilation saturates the cores), as workers
do at start-up and on new shapes; `--spinners` adds pure CPU hogs. Every process is bounded by
--seconds and killed by pid at the end. Exit status 1 if any worker was suspected.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_elastic_moe.runtime.detector import (DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT,  # noqa: E402
                                              HeartbeatMonitor, HeartbeatSender)


def compiling_worker(endpoint: str, rank: int, incarnation: int, seconds: float, counter):
    """Heartbeat while compiling a new small XLA program every iteration, for `seconds`."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    end = time.monotonic() + seconds
    with HeartbeatSender(endpoint, rank, incarnation=incarnation):
        n = 0
        while time.monotonic() < end:
            n += 1
            width = 8 + (n * 7 + rank) % 256  # a new shape each time: a fresh trace and compile

            def layer(x, w):
                for _ in range(4):
                    x = jnp.tanh(x @ w + 0.5 * jnp.sin(x))
                return jnp.sum(jax.nn.softmax(x, axis=-1))

            x = jnp.ones((16, width), jnp.float32)
            w = jnp.eye(width, dtype=jnp.float32)
            jax.jit(jax.grad(layer)).lower(x, w).compile()
            with counter.get_lock():
                counter.value += 1


def spin(seconds: float):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--spinners", type=int, default=0)
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    suspicions = []
    monitor = HeartbeatMonitor(startup_grace=60.0,
                               on_suspect=lambda r, s: suspicions.append((time.monotonic(), r, s)))
    procs = []
    compiles = ctx.Value("q", 0)
    with monitor:
        for rank in range(args.workers):
            monitor.watch(rank, incarnation=rank + 1)
            procs.append(ctx.Process(target=compiling_worker, daemon=True,
                                     args=(monitor.endpoint, rank, rank + 1, args.seconds, compiles)))
        procs += [ctx.Process(target=spin, args=(args.seconds,), daemon=True) for _ in range(args.spinners)]
        try:
            for proc in procs:
                proc.start()
            end = time.monotonic() + args.seconds
            while time.monotonic() < end - 1.0:  # stop judging before workers begin to exit
                time.sleep(0.5)
            load = os.getloadavg()
            health = {r: monitor.health(r) for r in range(args.workers)}
        finally:
            for proc in procs:
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
        "seconds": args.seconds, "workers": args.workers, "spinners": args.spinners,
        "heartbeat_interval": DEFAULT_HEARTBEAT_INTERVAL, "heartbeat_timeout": DEFAULT_HEARTBEAT_TIMEOUT,
        "loadavg_1_5_15": load, "xla_compiles": compiles.value,
        "beats": {r: h.beats for r, h in health.items()},
        "max_gap_s": {r: round(h.max_gap, 3) for r, h in health.items()},
        "suspicions": suspicions,
    }
    print(json.dumps(report, indent=2))
    return 1 if suspicions else 0


if __name__ == "__main__":
    sys.exit(main())
