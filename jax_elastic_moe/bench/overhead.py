"""`jem bench overhead`: the cost of the elastic machinery, as elastic throughput / plain throughput.

  jem bench overhead --config small --ranks 4 --redundant 4 --repeats 10 --json out.json --plot out.png

Two engines in one process over the same devices, the same weights and the same workload:
  plain    redundant_experts=0, backup=None (no host copy of the expert weights)
  elastic  redundant_experts=R, backup="host", precompile_fallbacks off unless --precompile-fallbacks
           (then the fallback meshes are compiled before timing, and that compile time is reported)
In both the active-ranks mask and the placement are arguments of every step (they always are); in
mooncake mode the elastic engine keeps its default health checks. After one warm-up run of each,
the runs alternate in pairs whose order flips every pair (plain, elastic, elastic, plain, ...) so
that a drift in the machine's speed falls on both. ratio = median elastic tokens/s / median plain
tokens/s; the spread is that of the per-pair ratios. On a shared machine other processes take cores
at random moments; two checks less exposed to that are reported beside it: ratio_of_best (fastest
elastic run / fastest plain run) and cpu_ratio (output tokens per CPU-second of this process,
elastic / plain: the work per token, whoever else runs). In spmd mode, flops_ratio = XLA's flop count
of the compiled decode step, plain / elastic: the extra work the elastic configuration compiles in
(XLA does not see inside FFI kernels: with the CPU grouped matmul kernel the experts' matmuls are
outside that count).

In mooncake mode a third configuration runs after those two: the non-elastic baseline
(runtime/distributed.py: the same model, weights, placement as the elastic engine and prompts, one
process per rank over jax.distributed with XLA's CPU collectives over gloo, all_to_all in
shard_map; it shares fate on a failure). ratio_vs_baseline = median elastic tokens/s / median
baseline tokens/s (its runs follow the engines', so a drift of the machine falls on it alone)."""
from __future__ import annotations

import argparse
import time

from . import common
from .throughput import measure_run


def decode_step_cost(eng) -> dict:
    """XLA's cost analysis of the compiled decode step (spmd): flops and bytes accessed, per device.
    Deterministic: it shows what the extra slots cost, free of timing noise."""
    decode = next(s for s in eng._scheduler.shapes() if s.kind == "decode")
    cost = eng._runtime.runner.step_fn(decode).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def run(args) -> dict:
    common.use_cpu_devices(args.ranks)
    bar = common.progress(2 * args.repeats + 2, "overhead", args.quiet)
    variants = {"plain": dict(redundant=0, backup=None),
                "elastic": dict(redundant=args.redundant, backup="host", **({"precompile_fallbacks": args.precompile_fallbacks}
                                                  if args.mode == "spmd" else {}))}
    engines = {name: common.build_engine(args, **kw) for name, kw in variants.items()}
    try:
        vocab = engines["plain"].cfg.vocab_size
        prompts = common.synthetic_prompts(args.batch, args.prompt_len, vocab, args.seed)
        warm = {}
        for name, eng in engines.items():
            warm[name] = measure_run(eng, prompts, args.new_tokens)
            bar.update(1)
        fallback = {}
        if args.precompile_fallbacks and args.mode == "spmd":
            t = time.perf_counter()
            fallback = {"meshes_ready": engines["elastic"].wait_fallbacks(),
                        "wait_s_after_warmup": time.perf_counter() - t}
        rates = {"plain": [], "elastic": []}
        per_cpu_s = {"plain": [], "elastic": []}
        outputs_identical = warm["plain"]["outputs"] == warm["elastic"]["outputs"]
        for i in range(args.repeats):
            order = ("plain", "elastic") if i % 2 == 0 else ("elastic", "plain")
            for name in order:
                r = measure_run(engines[name], prompts, args.new_tokens)
                rates[name].append(r["tokens_per_s"])
                per_cpu_s[name].append(r["tokens_per_cpu_s"])
                outputs_identical &= r["outputs"] == warm["plain"]["outputs"]
                bar.update(1)
        slots = {name: eng.slots_per_rank for name, eng in engines.items()}
        elastic_placement = engines["elastic"].placement
        step_cost = ({name: decode_step_cost(eng) for name, eng in engines.items()} if args.mode == "spmd" else None)
    finally:
        for eng in engines.values():
            eng.close()
        bar.close()
    plain, elastic = common.spread(rates["plain"]), common.spread(rates["elastic"])
    baseline = None
    if args.mode == "mooncake":
        from ..runtime.distributed import run_baseline
        base = run_baseline(args.config, args.dtype, args.ranks, elastic_placement, args.seed, prompts,
                            args.new_tokens, args.repeats)
        timed = [r["tokens_per_s"] for r in base["runs"] if not r.get("warmup")]
        baseline = {"tokens_per_s": common.spread(timed), "runs": timed,
                    "ratio_vs_baseline": elastic["median"] / common.spread(timed)["median"],
                    "outputs_identical": base["outputs"] == warm["elastic"]["outputs"]
                    and all(r.get("same", True) for r in base["runs"]),
                    "first_run_s_with_compile": base["runs"][0]["wall_s"]}
    pair_ratios = [e / p for e, p in zip(rates["elastic"], rates["plain"])]
    return {
        "ratio": elastic["median"] / plain["median"],
        "ratio_spread": common.spread(pair_ratios),
        "ratio_of_best": elastic["max"] / plain["max"],
        "cpu_ratio": common.spread(per_cpu_s["elastic"])["median"] / common.spread(per_cpu_s["plain"])["median"],
        "pair_ratios": pair_ratios,
        "plain_tokens_per_s": plain, "elastic_tokens_per_s": elastic,
        "plain_runs": rates["plain"], "elastic_runs": rates["elastic"],
        "plain_tokens_per_cpu_s": per_cpu_s["plain"], "elastic_tokens_per_cpu_s": per_cpu_s["elastic"],
        "slots_per_rank": slots, "variants": variants,
        "decode_step_cost": step_cost,
        "flops_ratio": step_cost["plain"]["flops"] / step_cost["elastic"]["flops"] if step_cost else None,
        "outputs_identical": outputs_identical,
        "first_run_s_with_compile": {name: w["wall_s"] for name, w in warm.items()},
        "fallback_precompile": fallback,
        "baseline": baseline,
    }


def table(result: dict, args) -> str:
    s = result["ratio_spread"]
    head = (f"{args.config} ({args.mode}): {args.ranks} ranks, batch {args.batch}, prompt {args.prompt_len}, "
            f"{args.new_tokens} new tokens, {args.repeats} alternating pairs; elastic = {args.redundant} redundant "
            f"experts + host backup; same tokens: {result['outputs_identical']}")
    rows = [[name, result["slots_per_rank"][name], t["median"], t["min"], t["max"], t["iqr"]]
            for name, t in (("plain", result["plain_tokens_per_s"]), ("elastic", result["elastic_tokens_per_s"]))]
    text = common.format_table(["engine", "slots/rank", "tokens/s median", "min", "max", "IQR"], rows)
    return (f"{head}\n{text}\nratio elastic/plain = {result['ratio']:.4f} (per-pair ratios: median "
            f"{s['median']:.4f}, min {s['min']:.4f}, max {s['max']:.4f}, IQR {s['iqr']:.4f}); "
            f"ratio of the fastest runs {result['ratio_of_best']:.4f}; tokens per CPU-second ratio "
            f"{result['cpu_ratio']:.4f}"
            + (f"; decode step flops plain/elastic {result['flops_ratio']:.4f} (XLA cost analysis)"
               if result["flops_ratio"] else "")
            + (f"\nnon-elastic baseline (jax.distributed, gloo all_to_all): {b['tokens_per_s']['median']:.1f} tokens/s "
               f"median; elastic/baseline = {b['ratio_vs_baseline']:.4f}; same tokens: {b['outputs_identical']}"
               if (b := result.get("baseline")) else ""))


def plot(result: dict, path: str):
    fig, (left, right) = common.new_figure(1, 2, figsize=(11, 4))
    for name in ("plain", "elastic"):
        runs = result[f"{name}_runs"]
        left.plot(range(1, len(runs) + 1), runs, marker="o", label=name)
    left.set(xlabel="pair", ylabel="output tokens/s", title="alternating runs")
    left.legend()
    right.plot(range(1, len(result["pair_ratios"]) + 1), result["pair_ratios"], marker="o")
    right.axhline(result["ratio"], color="k", linestyle="--", label=f"ratio of medians {result['ratio']:.3f}")
    right.axhline(0.98, color="r", linestyle=":", label="0.98")
    right.set(xlabel="pair", ylabel="elastic / plain", title="overhead ratio")
    right.legend()
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jem bench overhead", description=__doc__.split("\n")[0])
    common.add_workload_args(ap)
    ap.add_argument("--repeats", type=common.positive_int, default=10, help="alternating (plain, elastic) pairs after a warm-up")
    ap.add_argument("--precompile-fallbacks", action="store_true",
                    help="spmd: elastic engine precompiles the fallback meshes (waited for before timing)")
    return common.run_subcommand("overhead", ap, argv, run, table, plot)
