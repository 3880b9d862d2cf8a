"""`jem bench throughput`: output tokens/s, time to first token and time per output token.

  jem bench throughput --config small --ranks 4 --redundant 4 --batch 16 --prompt-len 32 --new-tokens 32
  jem bench throughput --config small --ranks 4 --redundant 4 --workload mixed

--workload fixed: --batch prompts of --prompt-len tokens, --new-tokens outputs each (stop tokens off).
--workload mixed: --num-requests requests with fixed-seed, long-tailed (log-normal) prompt lengths
in 16-512 and output lengths in 8-256, each with its own max_new_tokens; it runs under both admission
policies, "continuous" (requests admitted into slots as others finish) and "static" (admitted only
when every slot is free: a batch at a time), alternating, in one run, and checks both give the same
tokens. --batch is the number of decode slots in all (split over the ranks).

A warm-up run compiles; then --repeats timed runs (per policy). Per run: output tokens / wall time of
generate; per request, time to first token (generate start -> its first token: every request
arrives at the start) and time per output token (its first -> last token, over its tokens - 1)."""
from __future__ import annotations

import argparse
import time

import numpy as np

from . import common

MIXED_PROMPT = (16, 512)
MIXED_OUTPUT = (8, 256)


def mixed_workload(num: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """`num` prompts and per-request output lengths, long-tailed: log-normal around 64 prompt tokens and
    32 output tokens, clipped to MIXED_PROMPT and MIXED_OUTPUT."""
    rng = np.random.RandomState(seed)
    plen = np.clip(np.exp(rng.normal(np.log(64), 0.9, num)), *MIXED_PROMPT).astype(int)
    olen = np.clip(np.exp(rng.normal(np.log(32), 0.9, num)), *MIXED_OUTPUT).astype(int)
    return [rng.randint(2, vocab, size=int(n)).tolist() for n in plen], olen.tolist()


def measure_run(eng, prompts, new_tokens) -> dict:
    """One timed generate (new_tokens: one for all, or one per prompt): tokens/s, per-request time to
    first token and time per output token, the step log, and this process's CPU time in the run."""
    first = len(eng.step_log)
    cpu, start = time.process_time(), time.perf_counter()
    outs = eng.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    reqs = eng.last_requests
    tokens = sum(len(o.token_ids) for o in outs)
    return {"start": start, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "cpu_s": cpu, "tokens_per_cpu_s": tokens / max(cpu, 1e-9),
            "ttft_s": [r.token_times[0] - start for r in reqs],
            "tpot_s": [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
                       for r in reqs if len(r.token_times) > 1],
            "requeue_delay_s": [d for r in reqs for d in r.requeue_delays],
            "steps": [(t - start, n) for t, n in eng.step_log[first:]],
            "outputs": [o.token_ids for o in outs]}


def summarize(runs: list[dict], warm: dict) -> dict:
    return {"tokens_per_s": common.summary([r["tokens_per_s"] for r in runs]),
            "ttft_s": common.summary([x for r in runs for x in r["ttft_s"]]),
            "tpot_s": common.summary([x for r in runs for x in r["tpot_s"]]),
            "first_run_s_with_compile": warm["wall_s"],
            "outputs_same_every_run": all(r["outputs"] == warm["outputs"] for r in runs),
            "runs": [{k: v for k, v in r.items() if k != "outputs"} for r in runs]}


def run(args) -> dict:
    common.use_cpu_devices(args.ranks)
    mixed = args.workload == "mixed"
    policies = ["continuous", "static"] if mixed else [args.admission]
    if mixed:
        args.prompt_len, args.new_tokens = MIXED_PROMPT[1], MIXED_OUTPUT[1]     # max_model_len of the engine
    bar = common.progress(len(policies) * (args.repeats + 1), "throughput", args.quiet)
    with common.build_engine(args) as eng:
        if mixed:
            prompts, new = mixed_workload(args.num_requests, eng.cfg.vocab_size, args.seed)
        else:
            prompts, new = common.synthetic_prompts(args.batch, args.prompt_len, eng.cfg.vocab_size, args.seed), \
                args.new_tokens
        warm, runs = {}, {p: [] for p in policies}
        for p in policies:
            eng.admission = p
            warm[p] = measure_run(eng, prompts, new)
            bar.update(1)
        for _ in range(args.repeats):
            for p in policies:          # alternating: both see the same drift of a shared machine
                eng.admission = p
                runs[p].append(measure_run(eng, prompts, new))
                bar.update(1)
    bar.close()
    result = {p: summarize(runs[p], warm[p]) for p in policies}
    out = {"workload": args.workload, "policies": policies, **result[policies[0]], "by_policy": result}
    if mixed:
        out["requests"] = {"num": len(prompts), "prompt_len": common.summary([len(p) for p in prompts]),
                           "output_len": common.summary(new)}
        out["continuous_over_static"] = (result["continuous"]["tokens_per_s"]["mean"]
                                         / result["static"]["tokens_per_s"]["mean"])
        out["same_tokens_both_policies"] = warm["continuous"]["outputs"] == warm["static"]["outputs"]
    return out


def table(result: dict, args) -> str:
    what = (f"mixed workload, {result['requests']['num']} requests" if result["workload"] == "mixed"
            else f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    head = (f"{args.config} ({args.mode}): {args.ranks} ranks, {args.redundant} redundant, {what}, "
            f"{args.repeats} runs after a warm-up")
    rows = []
    for p in result["policies"]:
        r = result["by_policy"][p]
        rows += [[f"{p}: output tokens/s", r["tokens_per_s"]],
                 [f"{p}: time to first token (ms)", {k: v * 1e3 for k, v in r["ttft_s"].items() if k != "n"}],
                 [f"{p}: time per output token (ms)", {k: v * 1e3 for k, v in r["tpot_s"].items() if k != "n"}]]
    text = head + "\n" + common.format_table(
        ["metric", "mean", "p50", "p99", "min", "max"],
        [[name, s["mean"], s["p50"], s["p99"], s["min"], s["max"]] for name, s in rows])
    if result["workload"] == "mixed":
        text += (f"\ncontinuous / static output tokens/s: {result['continuous_over_static']:.2f}; "
                 f"same tokens under both policies: {result['same_tokens_both_policies']}")
    return text


def plot(result: dict, path: str):
    fig, (left, right) = common.new_figure(1, 2, figsize=(11, 4))
    for p in result["policies"]:
        r = result["by_policy"][p]["runs"][0]
        rates = common.step_rates([(t, n) for t, n in r["steps"]], 0.0)
        left.plot([t for t, _ in rates[1:]], [x for _, x in rates[1:]], marker=".", label=p)
        right.hist([x * 1e3 for run in result["by_policy"][p]["runs"] for x in run["tpot_s"]], bins=30,
                   alpha=0.6, label=p)
    left.set(xlabel="seconds since generate started", ylabel="output tokens/s (per step)", title="throughput")
    left.legend(fontsize=7)
    right.set(xlabel="time per output token (ms)", ylabel="requests", title="time per output token")
    right.legend()
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jem bench throughput", description=__doc__.split("\n")[0])
    common.add_workload_args(ap)
    ap.add_argument("--workload", default="fixed", choices=["fixed", "mixed"])
    ap.add_argument("--num-requests", type=common.positive_int, default=64, help="requests of the mixed workload")
    ap.add_argument("--admission", default="continuous", choices=["continuous", "static"],
                    help="admission policy (fixed workload; the mixed one runs both)")
    ap.add_argument("--repeats", type=common.positive_int, default=3, help="timed runs after the warm-up (per policy)")
    return common.run_subcommand("throughput", ap, argv, run, table, plot)
