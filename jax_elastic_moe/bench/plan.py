"""`jem plan`: the placement availability planner's command line, its tables and its plot (the
analysis itself is placement/planner.py).

CLI: jem plan --config configs/<preset>.yaml --ranks N --redundant R [--nodes M] [--json F] [--plot F]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ..placement.core import PlacementError
from ..placement.planner import BYTES_PER_PARAM, plan, read_model_shape


def _probability_text(row: dict) -> str:
    if row["method"] == "exact":
        return "0" if row["probability"] == 0 else "1" if row["probability"] == 1 else f"{row['probability']:.4f}"
    return f"{row['probability']:.3f} [{row['low']:.3f},{row['high']:.3f}]"


def format_report(report: dict) -> str:
    """The report as the tables `jem plan` prints."""
    load_names = report["loads"]
    seq = report["sequential"]
    steps = {step["k"]: step for step in seq["steps"]}
    lines = [
        f"jem plan: {report['config']}, {report['num_logical']} routed experts x {report['num_moe_layers']} MoE "
        f"layers, {report['ranks']} ranks x {report['slots_per_rank']} slots ({report['redundant']} redundant), "
        f"policy {report['policy']}",
        f"one expert's weights: {report['expert_bytes'] / 2**20:.1f} MiB; moved = expert weights loaded "
        f"after that failure, restored = of those, experts whose every replica was on the failed rank",
        "",
        f"{'k':>3} {'alive':>6} | {'sequential, re-placed after each failure':<44} | "
        f"simultaneous: P(some expert loses all replicas)",
        f"{'':>3} {'slots':>6} | {'served':<6} {'moved':>7} {'GiB':>7} {'restored':>8} {'imbalance':>10} | "
        + " | ".join(f"{name:<22}" for name in load_names),
    ]
    for k in range(1, report["ranks"] + 1):
        step = steps.get(k)
        alive_slots = (report["ranks"] - k) * report["slots_per_rank"]
        if step:
            seq_text = (f"{'yes':<6} {step['moved']:>7} {step['moved_bytes'] / 2**30:>7.1f} {step['restored']:>8} "
                        f"{step['imbalance_mean']:>10.4f}")
        else:
            seq_text = f"{'no':<6} {'':>7} {'':>7} {'':>8} {'':>10}"
        probabilities = " | ".join(f"{_probability_text(report['simultaneous'][n]['rows'][k - 1]):<22}"
                                   for n in load_names)
        lines.append(f"{k:>3} {alive_slots:>6} | {seq_text} | {probabilities}")
    lines += ["",
              f"sequential failures: largest k served = {seq['largest_k_served']} (slots allow "
              f"{seq['capacity_bound']}: (N - k) * S >= E); then {seq['stop_reason']}",
              "worst case (adversarial simultaneous failures): "
              + "; ".join(f"{n} load: an expert can be lost from k = {report['simultaneous'][n]['min_failures_to_lose']} "
                          f"({report['simultaneous'][n]['replicas_min']}..{report['simultaneous'][n]['replicas_max']} "
                          f"replicas per expert)" for n in load_names),
              "",
              "load imbalance, max / mean rank load (mean and worst over layers), all ranks alive:",
              f"{'policy':<24}" + "".join(f"{n + ' mean':>16}{n + ' max':>16}" for n in load_names) + f"{'seconds':>10}"]
    for name, by_load in report["imbalance"].items():
        seconds = max(v["seconds"] for v in by_load.values())
        lines.append(f"{name:<24}" + "".join(f"{by_load[n]['mean']:>16.4f}{by_load[n]['max']:>16.4f}"
                                             for n in load_names) + f"{seconds:>10.3f}")
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> None:
    """A PNG: loss probability against k for each load (with intervals, and the largest k that
    sequential failures serve), and the imbalance of each policy as bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in report["loads"]:
        rows = report["simultaneous"][name]["rows"]
        k = np.array([r["k"] for r in rows])
        p = np.array([r["probability"] for r in rows])
        err = np.array([[r["probability"] - r["low"] for r in rows], [r["high"] - r["probability"] for r in rows]])
        left.errorbar(k, p, yerr=err, marker="o", markersize=3, capsize=2, label=f"simultaneous, {name} load")
    served = report["sequential"]["largest_k_served"]
    left.axvline(served, color="k", linestyle="--", label=f"sequential with re-placement: up to k = {served}")
    left.set_xlabel("failed ranks k")
    left.set_ylabel("P(some expert loses all replicas)")
    left.set_ylim(-0.03, 1.03)
    left.set_title(f"{report['config']}: {report['ranks']} ranks x {report['slots_per_rank']} slots, "
                   f"{report['policy']}")
    left.legend(fontsize=8)
    names = list(report["imbalance"])
    width = 0.8 / len(report["loads"])
    for i, load_name in enumerate(report["loads"]):
        values = [report["imbalance"][n][load_name]["mean"] for n in names]
        bars = right.bar(np.arange(len(names)) + i * width, values, width, label=f"{load_name} load")
        right.bar_label(bars, fmt="%.3f", fontsize=7)
    right.axhline(1.0, color="k", linewidth=0.8)
    right.set_xticks(np.arange(len(names)) + width * (len(report["loads"]) - 1) / 2, names)
    right.set_ylabel("max / mean rank load (mean over layers)")
    right.set_title("load imbalance per policy")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """`jem plan`: prints the availability table; --json and --plot write the report and a PNG."""
    parser = argparse.ArgumentParser(prog="jem plan", description="Availability planner: how many rank failures "
                                     "a placement survives, and how well policies balance.")
    parser.add_argument("--config", required=True, help="model preset YAML (Hugging Face style keys)")
    parser.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks N")
    parser.add_argument("--redundant", type=int, default=0, help="redundant expert slots R (slots = E + R)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes, for deepseek_hierarchical")
    parser.add_argument("--groups", type=int, default=None, help="expert groups (default: the config's n_group)")
    parser.add_argument("--policy", default="deepseek_global", help="policy whose placement is analysed")
    parser.add_argument("--zipf", type=float, default=1.2, help="exponent of the skewed load")
    parser.add_argument("--layers", type=int, default=None, help="analyse this many MoE layers (default: all)")
    parser.add_argument("--bytes-per-param", type=int, default=BYTES_PER_PARAM, help="expert weight bytes per parameter")
    parser.add_argument("--samples", type=int, default=20_000, help="Monte Carlo samples per k")
    parser.add_argument("--exact-limit", type=int, default=200_000, help="count failure sets exactly up to this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG plot")
    args = parser.parse_args(argv)
    try:
        shape = read_model_shape(args.config)
        report = plan(shape, args.ranks, args.redundant, args.nodes, args.groups, args.policy, args.zipf,
                      args.seed, args.samples, args.exact_limit, args.bytes_per_param, args.layers)
    except (PlacementError, OSError, ValueError) as error:
        print(f"jem plan: error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot_report(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
