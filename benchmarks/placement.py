"""Placement benchmark: Zipf load imbalance per policy, time of one rebalance, and the expert weights
that move when one rank dies, with previous= and without.

Default shape: DeepSeek-V3 (256 routed experts) on 32 ranks with 256 redundant experts (16 slots
per rank), 61 layers, Zipf(1.2) load. Also times the 288-slot shape (32 redundant, 9 per rank).

    PYTHONPATH=. python3 benchmarks/placement.py [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from jax_elastic_moe.placement import movement, policies, rebalance
from jax_elastic_moe.placement.planner import read_model_shape, zipf_loads


def timed(repeats: int, fn):
    """(result of the last call, median seconds over `repeats` calls)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def balance_and_time(loads, num_ranks: int, slots_per_rank: int, repeats: int) -> dict:
    """{policy: {imbalance_mean, imbalance_max, seconds}} with all ranks alive."""
    out = {}
    for name in policies():
        placed, seconds = timed(repeats, lambda: rebalance(loads, num_ranks, slots_per_rank, name))
        balance = placed.imbalance(loads)
        out[name] = dict(imbalance_mean=float(balance.mean()), imbalance_max=float(balance.max()), seconds=seconds)
    return out


def kill_one_rank(loads, num_ranks: int, slots_per_rank: int, expert_bytes: int, dead_ranks, repeats: int) -> dict:
    """For each rank in dead_ranks: deepseek_global over the survivors, with previous= and without.
    Reports the (layer, slot) weights to load, relative to the experts the dead rank held."""
    before = rebalance(loads, num_ranks, slots_per_rank, "deepseek_global")
    runs = []
    for dead in dead_ranks:
        alive = np.ones(num_ranks, bool)
        alive[dead] = False
        held = int((before.phy2log[:, dead * slots_per_rank:(dead + 1) * slots_per_rank] >= 0).sum())
        run = dict(dead_rank=int(dead), dead_rank_experts=held)
        for label, previous in (("with_previous", before), ("without_previous", None)):
            after, seconds = timed(repeats, lambda: rebalance(loads, num_ranks, slots_per_rank, "deepseek_global",
                                                              alive=alive, previous=previous))
            moved = movement(before, after, expert_bytes, alive=alive)
            balance = after.imbalance(loads, alive)
            run[label] = dict(moved=moved.moved, moved_over_dead_rank=moved.moved / held, bytes=moved.bytes,
                              restored=moved.restored, imbalance_mean=float(balance.mean()),
                              imbalance_max=float(balance.max()), seconds=seconds)
        runs.append(run)
    worst = max(runs, key=lambda r: r["with_previous"]["moved_over_dead_rank"])
    return dict(runs=runs, worst_with_previous=worst["with_previous"]["moved_over_dead_rank"],
                mean_with_previous=float(np.mean([r["with_previous"]["moved_over_dead_rank"] for r in runs])),
                mean_without_previous=float(np.mean([r["without_previous"]["moved_over_dead_rank"] for r in runs])))


def kill_at_once(loads, num_ranks: int, slots_per_rank: int, expert_bytes: int, counts, repeats: int) -> dict:
    """For each k of `counts`: k ranks (spread out) fail at once; the recovery decision (deepseek_global
    over the survivors with previous=, what the controller runs) is timed, and the weights it loads
    are compared with what the dead ranks held (a restore that moves only what the failure requires
    loads about that much, whatever the rank count)."""
    before = rebalance(loads, num_ranks, slots_per_rank, "deepseek_global")
    rows = []
    for k in counts:
        dead = sorted({1 + (i * (num_ranks - 1)) // k for i in range(k)})
        alive = np.ones(num_ranks, bool)
        alive[dead] = False
        held = int(sum((before.phy2log[:, d * slots_per_rank:(d + 1) * slots_per_rank] >= 0).sum() for d in dead))
        cpu = time.process_time()
        after, seconds = timed(repeats, lambda: rebalance(loads, num_ranks, slots_per_rank, "deepseek_global",
                                                          alive=alive, previous=before))
        cpu = (time.process_time() - cpu) / repeats      # CPU seconds: what a shared machine's load does not add
        plan_s = timed(repeats, lambda: movement(before, after, expert_bytes, alive=alive))[1]
        moved = movement(before, after, expert_bytes, alive=alive)
        rows.append(dict(failed=k, dead_ranks=dead, dead_ranks_experts=held, decide_seconds=seconds,
                         decide_cpu_seconds=cpu, move_plan_seconds=plan_s, moved=moved.moved, moved_over_dead=moved.moved / held,
                         restored=moved.restored, bytes=moved.bytes,
                         imbalance_max=float(after.imbalance(loads, alive).max())))
    return dict(rows=rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/placement.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/deepseek_v3.yaml", help="model preset for the expert size")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=32)
    parser.add_argument("--redundant", type=int, default=256)
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--bytes-per-param", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timing: median of this many runs")
    parser.add_argument("--kills", type=int, default=8, help="kill each of this many ranks in turn (spread out)")
    parser.add_argument("--fail-counts", default="1,2,4,8,16",
                        help="ranks failing at once: time the recovery decision and count the weights it moves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    expert_bytes = read_model_shape(args.config).expert_bytes(args.bytes_per_param)
    loads = zipf_loads(args.layers, args.experts, args.zipf, seed=args.seed)
    slots_per_rank = (args.experts + args.redundant) // args.ranks
    small_slots = (args.experts + args.ranks) // args.ranks          # one redundant expert per rank
    dead_ranks = np.linspace(0, args.ranks - 1, min(args.kills, args.ranks)).round().astype(int)
    report = dict(
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(), python=platform.python_version(),
        shape=dict(experts=args.experts, ranks=args.ranks, redundant=args.redundant, slots_per_rank=slots_per_rank,
                   layers=args.layers, zipf=args.zipf, expert_bytes=expert_bytes),
        policies=balance_and_time(loads, args.ranks, slots_per_rank, args.repeats),
        policies_one_redundant_per_rank=dict(slots_per_rank=small_slots, results=balance_and_time(
            loads, args.ranks, small_slots, args.repeats)),
        kill_one_rank=kill_one_rank(loads, args.ranks, slots_per_rank, expert_bytes, dead_ranks, args.repeats),
        kill_at_once=kill_at_once(loads, args.ranks, slots_per_rank, expert_bytes,
                                  [int(k) for k in args.fail_counts.split(",") if k.strip()], args.repeats))
    print(f"{args.layers} layers, {args.experts} experts, Zipf({args.zipf:g}), {args.ranks} ranks")
    for title, slots, results in ((f"{args.redundant} redundant", slots_per_rank, report["policies"]),
                                  (f"{args.ranks} redundant", small_slots,
                                   report["policies_one_redundant_per_rank"]["results"])):
        print(f"\n{title} ({args.ranks} x {slots} = {args.ranks * slots} slots)")
        print(f"  {'policy':<24}{'imbalance mean':>16}{'imbalance max':>15}{'seconds/rebalance':>19}")
        for name, row in results.items():
            print(f"  {name:<24}{row['imbalance_mean']:>16.4f}{row['imbalance_max']:>15.4f}{row['seconds']:>19.4f}")
    kill = report["kill_one_rank"]
    print(f"\nkill 1 of {args.ranks} ranks (deepseek_global, ranks {dead_ranks.tolist()} in turn); "
          f"expert = {expert_bytes / 2**20:.0f} MiB")
    print(f"  {'dead':>4} {'its experts':>11} | {'moved with previous=':>21} {'GiB':>7} {'imbalance':>9} {'s':>6} | "
          f"{'moved without':>13} {'GiB':>7} {'imbalance':>9}")
    for run in kill["runs"]:
        w, wo = run["with_previous"], run["without_previous"]
        print(f"  {run['dead_rank']:>4} {run['dead_rank_experts']:>11} | {w['moved']:>10} ({w['moved_over_dead_rank']:.2f}x)"
              f"     {w['bytes'] / 2**30:>7.1f} {w['imbalance_max']:>9.4f} {w['seconds']:>6.3f} | "
              f"{wo['moved']:>13} {wo['bytes'] / 2**30:>7.1f} {wo['imbalance_max']:>9.4f}")
    print(f"  moved / dead rank's experts: with previous= mean {kill['mean_with_previous']:.3f}, "
          f"worst {kill['worst_with_previous']:.3f}; without: mean {kill['mean_without_previous']:.2f}")
    print("\nk ranks failing at once (deepseek_global with previous=, the controller's decision)")
    print(f"  {'k':>3} {'their experts':>13} {'moved':>7} {'/ theirs':>8} {'restored':>8} {'decide s':>9} "
          f"{'(CPU s)':>8} {'move plan s':>11} {'imbalance':>9}")
    for r in report["kill_at_once"]["rows"]:
        print(f"  {r['failed']:>3} {r['dead_ranks_experts']:>13} {r['moved']:>7} {r['moved_over_dead']:>8.3f} "
              f"{r['restored']:>8} {r['decide_seconds']:>9.4f} "
              f"{r['decide_cpu_seconds']:>8.4f} {r['move_plan_seconds']:>11.4f} {r['imbalance_max']:>9.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
