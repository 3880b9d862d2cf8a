"""`jem bench throughput`: output tokens/s, time to first token and time per output token of a
synthetic batch workload.

  jem bench throughput --config small --ranks 4 --redundant 4 --batch 16 --prompt-len 32 \
      --new-tokens 32 --repeats 5 --json out.json --plot out.png

Fixed-seed random prompts of --prompt-len tokens, --new-tokens outputs each (stop tokens off), one
static batch. A warm-up run compiles; then --repeats timed runs. Per run: output tokens / wall
time of generate; time to first token = generate start -> end of the prefill step (every request
of the static batch gets its first token from that step); time per output token = the interval
between consecutive decode steps (each step gives every unfinished request one token)."""
from __future__ import annotations

import argparse
import time

from . import common


def measure_run(eng, prompts, new_tokens: int) -> dict:
    """One timed generate: tokens/s, time to first token, the decode step intervals, the step log, and
    the CPU time of this process (all its threads) during the run."""
    first = len(eng.step_log)
    cpu, start = time.process_time(), time.perf_counter()
    outs = eng.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    steps = eng.step_log[first:]
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "cpu_s": cpu, "tokens_per_cpu_s": tokens / max(cpu, 1e-9),
            "ttft_s": steps[0][0] - start,
            "tpot_s": [b[0] - a[0] for a, b in zip(steps, steps[1:])],
            "steps": [(t - start, n) for t, n in steps],
            "outputs": [o.token_ids for o in outs]}


def run(args) -> dict:
    common.use_cpu_devices(args.ranks)
    bar = common.progress(args.repeats + 1, "throughput", args.quiet)
    with common.build_engine(args) as eng:
        prompts = common.synthetic_prompts(args.batch, args.prompt_len, eng.cfg.vocab_size, args.seed)
        warm = measure_run(eng, prompts, args.new_tokens)
        bar.update(1)
        runs = []
        for _ in range(args.repeats):
            runs.append(measure_run(eng, prompts, args.new_tokens))
            bar.update(1)
    bar.close()
    rates = [r["tokens_per_s"] for r in runs]
    result = {
        "tokens_per_s": common.summary(rates),
        "ttft_s": common.summary([r["ttft_s"] for r in runs]),
        "tpot_s": common.summary([x for r in runs for x in r["tpot_s"]]),
        "first_run_s_with_compile": warm["wall_s"],
        "outputs_same_every_run": all(r["outputs"] == warm["outputs"] for r in runs),
        "runs": [{k: v for k, v in r.items() if k != "outputs"} for r in runs],
    }
    return result


def table(result: dict, args) -> str:
    head = (f"{args.config} ({args.mode}): {args.ranks} ranks, {args.redundant} redundant, batch {args.batch}, "
            f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.repeats} runs after a warm-up "
            f"({result['first_run_s_with_compile']:.1f} s with compilation)")
    rows = [["output tokens/s", result["tokens_per_s"]],
            ["time to first token (ms)", {k: v * 1e3 for k, v in result["ttft_s"].items() if k != "n"}],
            ["time per output token (ms)", {k: v * 1e3 for k, v in result["tpot_s"].items() if k != "n"}]]
    return head + "\n" + common.format_table(
        ["metric", "mean", "p50", "p99", "min", "max"],
        [[name, s["mean"], s["p50"], s["p99"], s["min"], s["max"]] for name, s in rows])


def plot(result: dict, path: str):
    fig, (left, right) = common.new_figure(1, 2, figsize=(11, 4))
    for i, r in enumerate(result["runs"]):
        rates = common.step_rates([(t, n) for t, n in r["steps"]], 0.0)
        left.plot([t for t, _ in rates[1:]], [x for _, x in rates[1:]], marker=".", label=f"run {i + 1}")
    left.set(xlabel="seconds since generate started", ylabel="output tokens/s (per decode step)",
             title="decode throughput")
    left.legend(fontsize=7)
    tpot_ms = [x * 1e3 for r in result["runs"] for x in r["tpot_s"]]
    right.hist(tpot_ms, bins=30)
    for key, style in (("p50", "--"), ("p99", ":")):
        right.axvline(result["tpot_s"][key] * 1e3, color="k", linestyle=style, label=key)
    right.set(xlabel="time per output token (ms)", ylabel="decode steps", title="time per output token")
    right.legend()
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jem bench throughput", description=__doc__.split("\n")[0])
    common.add_workload_args(ap)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up")
    return common.run_subcommand("throughput", ap, argv, run, table, plot)
