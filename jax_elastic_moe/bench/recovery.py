"""`jem bench recovery`: fail ranks in the middle of a workload, and compare the interruption with a
full restart measured in the same run.

  jem bench recovery --mode spmd --ranks 4 --redundant 8 --fail 1,2 --json out.json --plot out.png
  jem bench recovery --mode spmd --ranks 32 --redundant 256 --config tiny_deepseek_256 --fail 1,2,4,8,16
  jem bench recovery ... --fail 1,2,4,8,16 --sequential        # one engine, one rank at a time up to 16

Simultaneous failures (default): for each count k of --fail, a fresh engine (same settings) runs the
workload once without a failure (the reference tokens), then again with k ranks failed at once
(--how) when engine step --at-step starts (default: the middle of decoding, after the prompts'
prefill chunks). --sequential: one engine, and each run after the reference fails one more rank, up
to the largest count, so one engine serves 1, 2, ... failures one after another; a row per failure.

Per row: interruption_s (the survivors' gap: last good step before the failure -> first good step
after, from the engine's recovery record), its breakdown (detect, decide, restore, compile, resume),
requeue_delay_s (what the dead ranks' requests, prefilled again on the survivors, wait from the
recovery to their next token), throughput after the failure over before (sequential: over the rate
with every rank alive) against the (N - k) / N expected of the survivors, outputs_identical (greedy
tokens equal to the run without a failure), requests_lost (requests without all their tokens), and
in spmd mode what the fallback programs' budget allowed (mesh sizes compiled, survivor sets loaded).
restart_s: a new process with the same settings and mode starts Python, imports JAX, builds the
engine, compiles and makes a first token (wall clock from the parent's spawn to that token). Each
rank gets KV-cache slots for batch / (ranks - max failed) requests, so the survivors can take the
dead ranks' requests at once.

The three ways a new spmd mesh gets its programs compare with three runs: --precompile-fallbacks
(default: compiled before the failure), --no-precompile-fallbacks (compiled at the failure), and
--no-precompile-fallbacks --compilation-cache-dir DIR --warm-cache (read from a persistent cache
that an engine seeing the same failure filled first)."""
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


def fallback_report(eng) -> dict | None:
    """spmd with precompiled fallbacks: what the background preparation did (mesh sizes compiled,
    survivor sets loaded per failure count, what stopped it: the sets budget or memory mappings)."""
    fb = getattr(getattr(eng, "_runtime", None), "fallbacks", None)
    return None if fb is None else {**fb.report, "loaded_sets": {str(k): v for k, v in fb.report.get(
        "loaded_sets", {}).items()}}


def failure_row(args, k: int, ranks: list[int], eng, prompts, reference: dict, restart_s: float,
                initial_rate: float | None = None) -> dict:
    """Fails `ranks` (k failed in all, counting earlier ones) when engine step --at-step starts, runs
    the workload on `eng`; the row of measurements against `reference` (the run without a failure).
    initial_rate: decode tokens/s with every rank alive (sequential failures: "before" is the run
    before this failure, the initial rate is what (N - k) / N applies to)."""
    if args.mode == "spmd" and args.precompile_fallbacks:
        eng.wait_fallbacks()
    ready = fallback_report(eng)
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
    base = rate_before if initial_rate is None else initial_rate
    expected = (args.ranks - k) / args.ranks
    interruption = sum(r["total_s"] for r in records)
    row = {
        "failed": k, "failed_ranks": ranks, "how": args.how, "at_step": args.at_step,
        "outputs_identical": run["outputs"] == reference["outputs"],
        "requests_lost": sum(len(o) != args.new_tokens for o in run["outputs"]) + len(prompts) - len(run["outputs"]),
        "interruption_s": interruption,
        "interruption_from_step_log_s": after[0][0] - before[-1][0] if before and after else None,
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
        "evidence": [r["evidence"] for r in records],
        "fallbacks": ready,
        "transient_retries": eng.transient_retries,
        "active_ranks_after": stats["active_ranks"],
        "throughput_before": rate_before, "throughput_after": rate_after,
        "throughput_initial": initial_rate,
        "after_over_before": rate_after / base if base and rate_after else None,
        "expected_fraction": expected,
        "reference_tokens_per_s": reference["tokens_per_s"], "generate_wall_s": run["wall_s"],
        "steps": steps,
    }
    row["throughput_ok"] = bool(row["after_over_before"] is not None
                                and row["after_over_before"] >= THROUGHPUT_FLOOR * expected)
    row["interruption_ok"] = row["interruption_over_restart"] <= INTERRUPTION_CEILING
    return row


def warm_cache(args, k: int, prompts):
    """--warm-cache: an engine that sees the same failure first, so the measured engine finds the new
    mesh's programs in the persistent compilation cache (what a cache shared between runs gives)."""
    import jax
    with common.build_engine(args, **engine_extra(args, precompile=False)) as warm:
        for r in failed_ranks(args.ranks, k):
            warm.fail_rank(r, how=args.how, at_step=args.at_step)
        warm.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])
    jax.clear_caches()                  # the measured engine reads the programs from disk, not memory


def engine_extra(args, precompile: bool | None = None) -> dict:
    extra = {"backup": "host", "compilation_cache_dir": args.compilation_cache_dir}
    if args.mode == "spmd":
        extra["precompile_fallbacks"] = args.precompile_fallbacks if precompile is None else precompile
        extra["fallback_depth"] = args.fallback_depth
    return extra


def simultaneous_rows(args, counts, prompts, restart_s, bar) -> list[dict]:
    """One fresh engine per count k: a run without a failure, then k ranks killed at once."""
    rows = []
    for k in counts:
        bar.set_postfix_str(f"{k} failed")
        if args.warm_cache:
            warm_cache(args, k, prompts)
        with common.build_engine(args, **engine_extra(args)) as eng:
            reference = measure_run(eng, prompts, args.new_tokens)
            rows.append(failure_row(args, k, failed_ranks(args.ranks, k), eng, prompts, reference, restart_s))
        save_partial(args, rows, restart_s)
        bar.update(1)
    return rows


def save_partial(args, rows, restart_s):
    """The rows so far to --json (marked partial): a long run that is stopped keeps what it measured."""
    if args.json:
        common.write_report(args.json, "recovery", args, restart_s=restart_s, rows=rows, partial=True,
                            scenario="sequential" if args.sequential else "simultaneous")


def sequential_rows(args, counts, prompts, restart_s, bar) -> list[dict]:
    """One engine: ranks fail one at a time, one per generate call, up to max(counts); a row per
    failure (k = ranks failed so far), each against the tokens of the run without a failure and the
    throughput with every rank alive."""
    order = failed_ranks(args.ranks, max(counts))
    rows = []
    with common.build_engine(args, **engine_extra(args)) as eng:
        measure_run(eng, prompts, args.new_tokens)            # warm-up: compile, and the fallbacks start
        reference = measure_run(eng, prompts, args.new_tokens)
        initial = common.decode_rate(reference["steps"])
        for k in range(1, max(counts) + 1):
            bar.set_postfix_str(f"{k} failed")
            rows.append(failure_row(args, k, [order[k - 1]], eng, prompts, reference, restart_s, initial))
            save_partial(args, rows, restart_s)
            bar.update(1)
    return rows


def run(args) -> dict:
    if args.batch is None:
        args.batch = 4 * args.ranks               # every rank has work, before and after failures
    prefill = common.prefill_steps(args)
    if args.at_step is None:
        args.at_step = prefill + args.new_tokens // 2
    counts = [int(x) for x in args.fail.split(",") if x.strip()]
    check_feasible(args, counts)
    if args.warm_cache and not args.compilation_cache_dir:
        raise common.SettingsError("--warm-cache needs --compilation-cache-dir")
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
    scenarios = max(counts) if args.sequential else len(counts)
    bar = common.progress(1 + scenarios, "recovery", args.quiet)
    bar.set_postfix_str("full restart")
    restart = restart_seconds(args, prompts)
    bar.update(1)
    make_rows = sequential_rows if args.sequential else simultaneous_rows
    rows = make_rows(args, counts, prompts, restart["restart_s"], bar)
    bar.close()
    return {"restart_s": restart["restart_s"], "restart_engine_kwargs": restart["engine_kwargs"], "rows": rows,
            "scenario": "sequential" if args.sequential else "simultaneous",
            "criteria": {"throughput_after": f">= {THROUGHPUT_FLOOR} x (N - k) / N x before",
                         "interruption_over_restart": f"<= {INTERRUPTION_CEILING}"}}


def table(result: dict, args) -> str:
    head = (f"{args.config} ({args.mode}, {result['scenario']} failures): {args.ranks} ranks, {args.redundant} "
            f"redundant, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, fail at step "
            f"{args.at_step} ({args.how}); full restart {result['restart_s']:.2f} s")
    base = "initial" if result["scenario"] == "sequential" else "before"
    headers = ["failed", "same", "lost", "detect", "decide", "restore", "compile", "resume", "interrupt",
               "/restart", "requeued", "their wait", f"tok/s {base}", "after", f"after/{base}", "(N-k)/N"]
    rows = [[r["failed"], r["outputs_identical"], r["requests_lost"], r["detect_s"], r["decide_s"], r["restore_s"],
             r["compile_s"], r["resume_s"], r["interruption_s"], r["interruption_over_restart"],
             r["requests_requeued"], r["requeue_delay_s"]["max"],
             r["throughput_initial"] or r["throughput_before"], r["throughput_after"], r["after_over_before"],
             r["expected_fraction"]]
            for r in result["rows"]]
    verdict = [f"{r['failed']} failed: requests_lost {r['requests_lost']}, outputs_identical {r['outputs_identical']}, "
               f"interruption/restart {r['interruption_over_restart']:.4f} "
               f"({'<=' if r['interruption_ok'] else '>'} {INTERRUPTION_CEILING}), after/{base} "
               f"{r['after_over_before'] or float('nan'):.3f} ({'>=' if r['throughput_ok'] else '<'} "
               f"{THROUGHPUT_FLOOR * r['expected_fraction']:.3f})" for r in result["rows"]]
    return head + "\n" + common.format_table(headers, rows) + "\n(seconds; tok/s over decode steps)\n" + "\n".join(verdict)


PUBLISHED_BAND_S = (6.0, 7.0)   # the reference result's interruption, 32 GPUs, 1-16 failed ranks


def plot(result: dict, path: str, others: list[tuple[str, dict]] = ()):
    """Two panels over the number of failed ranks k: the interruption (breakdown stacked) with the
    published 6-7 s band and each run's full restart, and throughput after the failure / before
    against (N - k) / N. `others`: (label, report) of more runs drawn on the same axes."""
    runs = [(f"{result['settings']['mode']}, {result['scenario']}", result)] + list(others)
    fig, (ax, bx) = common.new_figure(1, 2, figsize=(12, 4.5))
    ax.axhspan(*PUBLISHED_BAND_S, color="tab:orange", alpha=0.25, label="published: 6-7 s (32 GPUs)")
    markers = "osD^v"
    for i, (label, res) in enumerate(runs):
        rows = res["rows"]
        ks = [r["failed"] for r in rows]
        line = ax.plot(ks, [r["interruption_s"] for r in rows], marker=markers[i % 5], label=f"{label}: interruption")
        ax.axhline(res["restart_s"], color=line[0].get_color(), linestyle="--", linewidth=0.8,
                   label=f"{label}: full restart {res['restart_s']:.0f} s")
        bx.plot(ks, [r["after_over_before"] for r in rows], marker=markers[i % 5], color=line[0].get_color(),
                label=f"{label}: after / before")
    ks = sorted({r["failed"] for _, res in runs for r in res["rows"]})
    n = len(runs[0][1]["rows"][0]["active_ranks_after"]) + runs[0][1]["rows"][0]["failed"]
    bx.plot(ks, [(n - k) / n for k in ks], "k--", label="(N - k) / N")
    bx.plot(ks, [THROUGHPUT_FLOOR * (n - k) / n for k in ks], "k:", label=f"{THROUGHPUT_FLOOR} x (N - k) / N")
    ax.set(xscale="log", yscale="log", xlabel="failed ranks k", ylabel="seconds",
           title=f"interruption, {n} ranks")
    bx.set(xscale="log", xlabel="failed ranks k", ylabel="throughput after / before",
           title="throughput after the failure")
    for a in (ax, bx):
        a.set_xticks(ks)
        a.set_xticklabels([str(k) for k in ks])
        a.legend(fontsize=7)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jem bench recovery", description=__doc__.split("\n")[0])
    common.add_workload_args(ap, config="tiny_mixtral", batch=None, new_tokens=48)
    ap.add_argument("--fail", default="1,2", help="comma-separated counts of ranks to fail at once, a fresh "
                    "engine each (with --sequential: the counts to report, failing one rank at a time)")
    ap.add_argument("--sequential", action="store_true",
                    help="one engine; ranks fail one at a time, one per run, up to the largest --fail count")
    ap.add_argument("--how", default="kill", choices=["kill", "hang", "slow", "drop"],
                    help="failure to inject (spmd: kill only)")
    ap.add_argument("--at-step", type=common.positive_int, default=None,
                    help="engine step the failure hits (default: the middle of decoding)")
    ap.add_argument("--precompile-fallbacks", action=argparse.BooleanOptionalAction, default=True,
                    help="spmd: compile the next failures' meshes in the background before the failure")
    ap.add_argument("--fallback-depth", type=common.positive_int, default=2,
                    help="spmd: compile the mesh sizes of 1 .. this many failures")
    ap.add_argument("--compilation-cache-dir", help="persistent JAX compilation cache (also for the restart)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="before each count, an engine that sees the same failure warms --compilation-cache-dir")
    ap.add_argument("--compare", action="append", default=[], metavar="LABEL=REPORT.json",
                    help="draw another run's report on the plot too (repeatable)")
    ap.add_argument("--from-json", metavar="REPORT.json",
                    help="run nothing: the table and --plot of a report written earlier (with --compare)")
    args_seen = {}

    def plot_with_others(result, path):
        others = []
        for spec in args_seen["args"].compare:
            label, _, file = spec.partition("=")
            with open(file) as f:
                others.append((label, json.load(f)))
        plot({**result, "settings": result.get("settings") or vars(args_seen["args"])}, path, others)

    def run_keep(args):
        args_seen["args"] = args
        if args.from_json:
            with open(args.from_json) as f:
                report = json.load(f)
            for k, v in report["settings"].items():
                if k not in ("compare", "from_json"):
                    setattr(args, k, v)
            args.json = None                    # the report stays as it was
            return {k: v for k, v in report.items() if k not in ("benchmark", "machine")}
        return run(args)
    return common.run_subcommand("recovery", ap, argv, run_keep, table, plot_with_others)
