"""Mooncake transport on loopback: all-to-all exchange latency and time to detect a killed / hung peer.

    python3 benchmarks/transport_bench.py                   # 4 ranks, 64 rows x 4096 B per pair
    python3 benchmarks/transport_bench.py --load 4          # same with 4 CPU spinners running
    python3 benchmarks/transport_bench.py --skip-failures   # latency only

Every rank is a child process owning a Transport on 127.0.0.1 (TCP). Latency is the wall time of one
`Transport.exchange` (send to every rank incl. itself, wait for every rank's data + signal), measured
inside each rank over back-to-back steps. Detection time is t(exchange returned naming the peer) -
t(signal sent), across processes on CLOCK_MONOTONIC.
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
from jax_elastic_moe.runtime.loopback import LoopbackCluster  # noqa: E402
from jax_elastic_moe.runtime.transport import DEFAULT_EXCHANGE_TIMEOUT  # noqa: E402


def spin(seconds: float):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def percentiles(values):
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"n": len(values), "median_ms": 1e3 * statistics.median(values), "p90_ms": 1e3 * pick(0.9),
            "p99_ms": 1e3 * pick(0.99), "max_ms": 1e3 * values[-1]}


def measure_latency(args) -> dict:
    ranks = list(range(args.ranks))
    with LoopbackCluster(args.ranks, max_rows=args.rows, row_bytes=args.row_bytes) as cluster:
        assert cluster.install_peers() == {r: None for r in ranks}
        cluster.call_all(ranks, "run", wait=60, first_seq=1, steps=50, rows=args.rows, dests=ranks,
                         timeout=args.timeout)  # warm-up: connections, page faults
        results = cluster.call_all(ranks, "run", wait=600, first_seq=100, steps=args.steps, rows=args.rows,
                                   dests=ranks, timeout=args.timeout)
    failures = {r: out["failed"] for r, out in results.items() if out["failed"]}
    latencies = [x for out in results.values() for x in out["latencies"]]
    return {"exchange": percentiles(latencies), "failed_steps": failures}


def measure_detection(args, how: str) -> dict:
    ranks = list(range(args.ranks))
    victim = ranks[-1]
    times, reclaims = [], []
    for trial in range(args.trials):
        with LoopbackCluster(args.ranks, max_rows=args.rows, row_bytes=args.row_bytes) as cluster:
            assert cluster.install_peers() == {r: None for r in ranks}
            for rank in ranks:
                cluster.submit(rank, "run", first_seq=1, steps=10**6, rows=args.rows, dests=ranks,
                               timeout=args.timeout)
            time.sleep(0.5 + 0.37 * trial)  # hit different points of a step
            hit = cluster.signal(victim, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            for rank in ranks[:-1]:
                out = cluster.collect(rank, wait=args.timeout + 10)
                assert victim in out["failed"], out
                times.append(out["t_detect"] - hit)
            if how == "stop":  # until Mooncake fails the writes abandoned to the still-stopped rank
                while time.monotonic() - hit < 30:
                    orphans = sum(s["orphans"] for s in cluster.call_all(ranks[:-1], "state").values())
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
        report["killed_peer"] = measure_detection(args, "kill")
        report["hung_peer"] = measure_detection(args, "stop")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
