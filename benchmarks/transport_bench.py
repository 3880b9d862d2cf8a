"""Mooncake transport on loopback: all-to-all exchange latency, old (Python) and new (C++ FFI op)
exchange side by side, and time to detect a killed / hung peer with each.

    python3 benchmarks/transport_bench.py                   # 4 ranks, 64 rows x 4096 B per pair
    python3 benchmarks/transport_bench.py --load 4          # same with 4 CPU spinners running
    python3 benchmarks/transport_bench.py --skip-failures   # latency only

Every rank is a child process owning a Transport on 127.0.0.1 (TCP). Latency is the wall time of one
all-to-all (send to every rank incl. itself, wait for every rank's data + signal), measured inside
each rank over back-to-back steps, for each exchange (testing/exchange_check.py):
  python    `Transport.exchange` called from Python (the old exchange, without the jit around it)
  callback  the same inside a jitted function through io_callback: the old per-layer path
  native    the jem_exchange FFI op inside a jitted function: the new per-layer path
            (`native_inner`: the op's own time in C++, without JAX's dispatch)
Detection time is t(exchange returned naming the peer) - t(signal sent), across processes on
CLOCK_MONOTONIC.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_elastic_moe.bench.common import cpu_model  # noqa: E402
from jax_elastic_moe.testing.loopback import LoopbackCluster  # noqa: E402
from jax_elastic_moe.runtime.transport import DEFAULT_EXCHANGE_TIMEOUT  # noqa: E402

CHECK = "jax_elastic_moe.testing.exchange_check:"
MODES = ("python", "callback", "native")


def spin(seconds: float):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def percentiles(values):
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"n": len(values), "min_ms": 1e3 * values[0], "median_ms": 1e3 * statistics.median(values),
            "p90_ms": 1e3 * pick(0.9),
            "p99_ms": 1e3 * pick(0.99), "max_ms": 1e3 * values[-1]}


def _cluster(args):
    return LoopbackCluster(args.ranks, max_rows=args.rows, row_bytes=args.row_bytes, env={"JAX_PLATFORMS": "cpu"})


def _start(cluster, ranks):
    assert cluster.install_peers() == {r: None for r in ranks}
    cluster.call_all(ranks, "invoke", wait=120, target=CHECK + "start_native")
    cluster.call_all(ranks, "invoke", wait=60, target=CHECK + "install_native")


def _run_kwargs(args, mode: str, first_step: int, steps: int) -> dict:
    return dict(target=CHECK + "run", mode=mode, first_step=first_step, steps=steps, tokens=args.rows,
                spec=[((args.row_bytes // 4,), "float32")], counts="full", timeout=args.timeout, check=False)


def measure_latency(args) -> dict:
    ranks = list(range(args.ranks))
    out = {}
    with _cluster(args) as cluster:
        _start(cluster, ranks)
        for i, mode in enumerate(MODES):
            first = 1 + i * 10 * (args.steps + 100)
            # warm-up: connections, page faults, the jit compile
            cluster.call_all(ranks, "invoke", wait=300, **_run_kwargs(args, mode, first, 50))
            results = cluster.call_all(ranks, "invoke", wait=900, **_run_kwargs(args, mode, first + 100, args.steps))
            failures = {r: res["failed"] for r, res in results.items() if res["failed"]}
            out[mode] = percentiles([x for res in results.values() for x in res["latencies"]])
            if failures:
                out[mode]["failed_steps"] = failures
            if mode == "native":
                out["native_inner"] = percentiles([x for res in results.values() for x in res["inner"]])
    return out


def measure_detection(args, how: str, mode: str) -> dict:
    ranks = list(range(args.ranks))
    victim = ranks[-1]
    times, reclaims = [], []
    for trial in range(args.trials):
        with _cluster(args) as cluster:
            _start(cluster, ranks)
            cluster.call_all(ranks, "invoke", wait=300, **_run_kwargs(args, mode, 1, 20))  # compile
            for rank in ranks:
                cluster.submit(rank, "invoke", **_run_kwargs(args, mode, 100, 10**6))
            time.sleep(0.5 + 0.37 * trial)  # hit different points of a step
            hit = cluster.signal(victim, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            for rank in ranks[:-1]:
                out = cluster.collect(rank, wait=args.timeout + 10)
                assert victim in out["failed"], out
                times.append(out["t_detect"] - hit)
            if how == "stop":  # until Mooncake fails the writes abandoned to the still-stopped rank
                while time.monotonic() - hit < 30:
                    python = cluster.call_all(ranks[:-1], "state").values()
                    native = cluster.call_all(ranks[:-1], "invoke", target=CHECK + "native_state").values()
                    orphans = sum(s["orphans"] for s in [*python, *native])
                    if orphans == 0:
                        reclaims.append(round(time.monotonic() - hit, 2))
                        break
                    time.sleep(0.1)
    out = {"detect": percentiles(times)}
    if how == "stop":
        out["orphans_reclaimed_after_s"] = reclaims  # one per trial that reclaimed within 30 s
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--row-bytes", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--trials", type=int, default=3, help="kill / hang trials, a fresh cluster each")
    parser.add_argument("--timeout", type=float, default=DEFAULT_EXCHANGE_TIMEOUT, help="exchange deadline (s)")
    parser.add_argument("--load", type=int, default=0, help="CPU spinner processes during the latency run")
    parser.add_argument("--skip-failures", action="store_true")
    args = parser.parse_args()

    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "cpu_model": cpu_model(), "python": platform.python_version(), "args": vars(args)}
    spinners = [mp.get_context("spawn").Process(target=spin, args=(3600,), daemon=True) for _ in range(args.load)]
    try:
        for proc in spinners:
            proc.start()
        report["latency"] = measure_latency(args)
    finally:
        for proc in spinners:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(5)
    if not args.skip_failures:
        for mode in ("python", "native"):
            report[f"killed_peer_{mode}"] = measure_detection(args, "kill", mode)
            report[f"hung_peer_{mode}"] = measure_detection(args, "stop", mode)
    lat = report["latency"]
    report["summary"] = {f"{name} p50/p99 ms": [round(lat[name]["median_ms"], 3), round(lat[name]["p99_ms"], 3)]
                         for name in ("python", "callback", "native", "native_inner")}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
