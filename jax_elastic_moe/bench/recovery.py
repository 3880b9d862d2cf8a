"""`jem bench recovery`: fail ranks in the middle of a workload, and compare the interruption with a
full restart measured in the same run.

  jem bench recovery --mode spmd --ranks 4 --redundant 8 --fail 1,2 --json out.json --plot out.png

For each count k of --fail, a fresh engine (same settings) runs the workload once without a failure
(warm-up: compilation, and the reference tokens), then again with k ranks failed (--how) when engine
step --at-step starts (default: the middle of decoding, after the prompts' prefill chunks). Per row:
interruption_s (the survivors' gap: last good step before the failure -> first good step after,
from the engine's recovery record), its breakdown (detect, decide, restore, compile, resume),
requeue_delay_s (what the dead ranks' requests, prefilled again on the survivors, wait from the
recovery to their next token), throughput before and after against the (N - k) / N expected of the
survivors, outputs_identical (greedy tokens equal to the run without a failure) and requests_lost
(requests without all their tokens).
restart_s: a new process with the same settings and mode starts Python, imports JAX, builds the
engine, compiles and makes a first token (wall clock from the parent's spawn to that token). Each
rank gets KV-cache slots for batch / (ranks - max failed) requests, so the survivors can take the
dead ranks' requests at once."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from . import common
from .throughput import measure_run

THROUGHPUT_FLOOR = 0.85        # after >= 0.85 x (N - k) / N x before
INTERRUPTION_CEILING = 0.05    # interruption_s / restart_s


BREAKDOWN = ("detect_s", "decide_s", "restore_s", "compile_s", "resume_s", "total_s")

RESTART_CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import jax
try:
    jax.config.update("jax_num_cpu_devices", spec["ranks"])
except Exception:
    pass
import jax_elastic_moe as jem
eng = jem.Engine.from_config(spec["config"], **spec["engine"])
eng.generate(spec["prompts"], max_new_tokens=1, stop_token_ids=[])
print("FIRST_TOKEN_AT", time.time(), flush=True)   # the restart is over here; the teardown is not timed
eng.close()
"""


def failed_ranks(num_ranks: int, k: int) -> list[int]:
    """k ranks spread over 1..N-1 (rank 0 kept: the one that survives in every row)."""
    return sorted({1 + (i * (num_ranks - 1)) // k for i in range(k)})


def check_feasible(args, counts: list[int]):
    """Raises common.SettingsError naming the redundancy needed when some count leaves too few slots."""
    from ..config import load_config_file
    from ..config import resolve_preset
    experts = load_config_file(resolve_preset(args.config)).num_experts
    slots = experts + args.redundant
    if slots % args.ranks:
        raise common.SettingsError(f"{experts} experts + {args.redundant} redundant = {slots} slots do not divide over "
                         f"{args.ranks} ranks")
    per_rank = slots // args.ranks
    for k in counts:
        if not 0 < k < args.ranks:
            raise common.SettingsError(f"--fail {k}: a count must be between 1 and ranks - 1 = {args.ranks - 1}")
        if (args.ranks - k) * per_rank < experts:
            need = -(-experts * args.ranks // (args.ranks - k)) - experts
            raise common.SettingsError(
                f"--fail {k}: {args.ranks - k} surviving ranks x {per_rank} slots = {(args.ranks - k) * per_rank} "
                f"slots cannot hold the {experts} experts of {args.config}; with {args.ranks} ranks, surviving "
                f"{k} failures needs --redundant >= {need} (and experts + redundant divisible by ranks)")


def restart_seconds(args, prompts) -> dict:
    """A full restart in a subprocess: spawn -> first token, same settings and mode."""
    engine = common.engine_kwargs(args)
    if args.compilation_cache_dir:
        engine["compilation_cache_dir"] = args.compilation_cache_dir
    spec = {"config": args.config, "ranks": args.ranks, "engine": engine, "prompts": prompts}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [common.REPO_ROOT, os.environ.get("PYTHONPATH")])))
    spawned = time.time()
    out = subprocess.run([sys.executable, "-c", RESTART_CHILD, json.dumps(spec)], capture_output=True,
                         text=True, timeout=900, env=env)
    if out.returncode or "FIRST_TOKEN_AT" not in out.stdout:
        raise RuntimeError(f"the restart subprocess failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    first_token_at = float(out.stdout.split("FIRST_TOKEN_AT")[1].split()[0])
    return {"restart_s": first_token_at - spawned, "engine_kwargs": engine}


def failure_row(args, k: int, eng, prompts, restart_s: float) -> dict:
    """Runs the workload on `eng` without, then with, k failed ranks; the row of measurements."""
    reference = measure_run(eng, prompts, args.new_tokens)
    ready = eng.wait_fallbacks() if args.mode == "spmd" and args.precompile_fallbacks else None
    ranks = failed_ranks(args.ranks, k)
    known = len(eng.stats()["recoveries"])
    for r in ranks:
        eng.fail_rank(r, how=args.how, at_step=args.at_step)
    run = measure_run(eng, prompts, args.new_tokens)
    stats = eng.stats()
    records = stats["recoveries"][known:]
    if not records:
        raise RuntimeError(f"failing ranks {ranks} at step {args.at_step} caused no recovery")
    steps = run["steps"]                       # (seconds since generate started, tokens) per good step
    resumed = records[-1]["resumed_at"] - run["start"]
    failed = records[0]["resumed_at"] - records[0]["total_s"] - run["start"]
    before = [st for st in steps if st[0] <= failed + 1e-9]
    after = [st for st in steps if st[0] >= resumed - 1e-9]
    rate_before, rate_after = common.decode_rate(before), common.decode_rate(after)
    expected = (args.ranks - k) / args.ranks
    interruption = sum(r["total_s"] for r in records)
    row = {
        "failed": k, "failed_ranks": ranks, "how": args.how, "at_step": args.at_step,
        "outputs_identical": run["outputs"] == reference["outputs"],
        "requests_lost": sum(len(o) != args.new_tokens for o in run["outputs"]) + len(prompts) - len(run["outputs"]),
        "interruption_s": interruption,
        "interruption_from_step_log_s": after[0][0] - before[-1][0],
        "failed_at_s": failed, "resumed_at_s": resumed,
        "requeue_delay_s": common.summary(run["requeue_delay_s"]),
        "restart_s": restart_s,
        "interruption_over_restart": interruption / restart_s,
        "recoveries": len(records),
        **{key: sum(r[key] for r in records) for key in BREAKDOWN},
        "moved_experts": sum(r["moved_experts"] for r in records),
        "restored_from_backup": sum(r["restored_from_backup"] for r in records),
        "requests_requeued": sum(r["requests_requeued"] for r in records),
        "precompiled": all(r["precompiled"] for r in records),
        "fallback_meshes_ready": ready,
        "active_ranks_after": stats["active_ranks"],
        "throughput_before": rate_before, "throughput_after": rate_after,
        "after_over_before": rate_after / rate_before if rate_before and rate_after else None,
        "expected_fraction": expected,
        "reference_tokens_per_s": reference["tokens_per_s"], "generate_wall_s": run["wall_s"],
        "steps": steps,
    }
    row["throughput_ok"] = bool(row["after_over_before"] is not None
                                and row["after_over_before"] >= THROUGHPUT_FLOOR * expected)
    row["interruption_ok"] = row["interruption_over_restart"] <= INTERRUPTION_CEILING
    return row


def run(args) -> dict:
    if args.batch is None:
        args.batch = 4 * args.ranks               # every rank has work, before and after failures
    prefill = common.prefill_steps(args)
    if args.at_step is None:
        args.at_step = prefill + args.new_tokens // 2
    counts = [int(x) for x in args.fail.split(",") if x.strip()]
    check_feasible(args, counts)
    args.survivors = args.ranks - max(counts)      # KV-cache slots for every request after the failure
    if not prefill + 3 <= args.at_step <= prefill + args.new_tokens - 3:
        raise common.SettingsError(
            f"--at-step {args.at_step}: needs {prefill + 3} <= at_step <= {prefill + args.new_tokens - 3} (the "
            f"prompts take {prefill} prefill steps; decode steps on both sides of the failure to measure throughput)")
    common.use_cpu_devices(args.ranks)
    from ..config import load_config_file
    from ..config import resolve_preset
    vocab = load_config_file(resolve_preset(args.config)).vocab_size
    prompts = common.synthetic_prompts(args.batch, args.prompt_len, vocab, args.seed)
    bar = common.progress(1 + len(counts), "recovery", args.quiet)
    bar.set_postfix_str("full restart")
    restart = restart_seconds(args, prompts)
    bar.update(1)
    extra = {"backup": "host", "compilation_cache_dir": args.compilation_cache_dir}
    if args.mode == "spmd":
        extra["precompile_fallbacks"] = args.precompile_fallbacks
    rows = []
    for k in counts:
        bar.set_postfix_str(f"{k} failed")
        with common.build_engine(args, **extra) as eng:
            rows.append(failure_row(args, k, eng, prompts, restart["restart_s"]))
        bar.update(1)
    bar.close()
    return {"restart_s": restart["restart_s"], "restart_engine_kwargs": restart["engine_kwargs"], "rows": rows,
            "criteria": {"throughput_after": f">= {THROUGHPUT_FLOOR} x (N - k) / N x before",
                         "interruption_over_restart": f"<= {INTERRUPTION_CEILING}"}}


def table(result: dict, args) -> str:
    head = (f"{args.config} ({args.mode}): {args.ranks} ranks, {args.redundant} redundant, batch {args.batch}, "
            f"prompt {args.prompt_len}, {args.new_tokens} new tokens, fail at step {args.at_step} "
            f"({args.how}); full restart {result['restart_s']:.2f} s")
    headers = ["failed", "same", "lost", "detect", "decide", "restore", "compile", "resume", "interrupt",
               "/restart", "requeued", "their wait", "tok/s before", "after", "after/before", "(N-k)/N"]
    rows = [[r["failed"], r["outputs_identical"], r["requests_lost"], r["detect_s"], r["decide_s"], r["restore_s"],
             r["compile_s"], r["resume_s"], r["interruption_s"], r["interruption_over_restart"],
             r["requests_requeued"], r["requeue_delay_s"]["max"],
             r["throughput_before"], r["throughput_after"], r["after_over_before"], r["expected_fraction"]]
            for r in result["rows"]]
    verdict = [f"{r['failed']} failed: requests_lost {r['requests_lost']}, outputs_identical {r['outputs_identical']}, "
               f"interruption/restart {r['interruption_over_restart']:.4f} "
               f"({'<=' if r['interruption_ok'] else '>'} {INTERRUPTION_CEILING}), after/before "
               f"{r['after_over_before']:.3f} ({'>=' if r['throughput_ok'] else '<'} "
               f"{THROUGHPUT_FLOOR * r['expected_fraction']:.3f})" for r in result["rows"]]
    return head + "\n" + common.format_table(headers, rows) + "\n(seconds; tok/s over decode steps)\n" + "\n".join(verdict)


def plot(result: dict, path: str):
    rows = result["rows"]
    fig, axes = common.new_figure(len(rows), 1, figsize=(10, 3.2 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        rates = common.step_rates(r["steps"], 0.0)
        failed_at, recovered_at = r["failed_at_s"], r["resumed_at_s"]
        before = [x for x in rates[1:] if x[0] <= failed_at + 1e-9]
        after = [x for x in rates if x[0] > recovered_at + 1e-9]      # the first step after spans the gap
        for part, label in ((before, "output tokens/s per step"), (after, None)):
            ax.plot([t for t, _ in part], [x for _, x in part], marker=".", color="tab:blue", label=label)
        ax.axvspan(failed_at, recovered_at, color="tab:red", alpha=0.2,
                   label=f"failure of ranks {r['failed_ranks']} -> recovered ({r['interruption_s']:.3f} s)")
        ax.axvline(failed_at, color="tab:red", linestyle="--")
        for rate, style, name in ((r["throughput_before"], ":", "before"), (r["throughput_after"], "-.", "after")):
            ax.axhline(rate, color="k", linestyle=style, linewidth=0.8, label=f"{name}: {rate:.0f} tok/s")
        ax.set(ylabel="tokens/s", title=f"{r['failed']} of {len(r['active_ranks_after']) + r['failed']} ranks failed")
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("seconds since generate started")
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jem bench recovery", description=__doc__.split("\n")[0])
    common.add_workload_args(ap, config="tiny_mixtral", batch=None, new_tokens=48)
    ap.add_argument("--fail", default="1,2", help="comma-separated counts of ranks to fail, one row each")
    ap.add_argument("--how", default="kill", choices=["kill", "hang", "slow", "drop"],
                    help="failure to inject (spmd: kill only)")
    ap.add_argument("--at-step", type=common.positive_int, default=None,
                    help="engine step the failure hits (default: the middle of decoding)")
    ap.add_argument("--precompile-fallbacks", action=argparse.BooleanOptionalAction, default=True,
                    help="spmd: compile the one-failure meshes in the background before the failure")
    ap.add_argument("--compilation-cache-dir", help="persistent JAX compilation cache (also for the restart)")
    return common.run_subcommand("recovery", ap, argv, run, table, plot)
