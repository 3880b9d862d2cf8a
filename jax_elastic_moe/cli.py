"""`jem`: the command line. Subcommands: generate, demo (the elastic demo), worker (ranks of a
multi-host engine), plan (placement planner), bench (benchmarks)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .bench.common import finite_float, nonnegative_int, positive_int
from .kinds import FailureKind, Mode


def cmd_generate(args) -> int:
    from .bench.common import synthetic_prompts, use_cpu_devices
    use_cpu_devices(args.ranks)
    import jax_elastic_moe as jem
    kw = dict(num_ranks=args.ranks, redundant_experts=args.redundant, dtype=args.dtype,
              seqs_per_rank=args.seqs_per_rank, max_model_len=args.max_model_len)
    t0 = time.perf_counter()
    eng = (jem.Engine.from_pretrained(args.model, **kw) if args.model
           else jem.Engine.from_config(args.config, seed=args.seed, **kw))
    load_s = time.perf_counter() - t0
    if args.prompt:
        prompts = [p if eng.tokenizer else [int(t) for t in p.split(",")] for p in args.prompt]
    else:
        prompts = synthetic_prompts(args.num_prompts, args.prompt_len, eng.cfg.vocab_size, args.seed, vary=True)
    t1 = time.perf_counter()
    outs = eng.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, progress=not args.quiet)
    gen_s = time.perf_counter() - t1
    tokens = sum(len(o.token_ids) for o in outs)
    for i, o in enumerate(outs[: args.show]):
        print(f"[{i}] {o.text if o.text is not None else o.token_ids}")
    print(f"{len(outs)} prompts, {tokens} tokens in {gen_s:.2f} s ({tokens / gen_s:.1f} tokens/s, "
          f"first call includes compilation); engine start {load_s:.2f} s; ranks={args.ranks} "
          f"slots/rank={eng.slots_per_rank}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"outputs": [o.token_ids for o in outs], "tokens": tokens, "seconds": gen_s}, f)
    eng.close()
    return 0


def cmd_demo(args) -> int:
    """The elastic demo: batch generation on N ranks, one killed mid-run; the recovery timeline, and
    the tokens against a run with no failure."""
    from .bench.common import synthetic_prompts, use_cpu_devices
    use_cpu_devices(max(args.ranks, 1))
    import jax_elastic_moe as jem
    print(f"reference: {args.config}, one device, no failure ...", flush=True)
    # KV-cache slots for every request at once, as long as the longest request needs
    slots = dict(seqs_per_rank=-(-args.num_prompts // args.ranks), max_model_len=args.prompt_len + args.max_new_tokens)
    with jem.Engine.from_config(args.config, num_ranks=1, seed=args.seed, **slots) as ref:
        prompts = synthetic_prompts(args.num_prompts, args.prompt_len, ref.cfg.vocab_size, args.seed, vary=True)
        want = [o.token_ids for o in ref.generate(prompts, max_new_tokens=args.max_new_tokens, stop_token_ids=[])]
    print(f"starting {args.ranks} ranks (mode={args.mode}), {args.redundant} redundant experts ...", flush=True)
    t0 = time.perf_counter()
    kw = {"mode": args.mode} if args.mode != "spmd" else {}
    with jem.Engine.from_config(args.config, num_ranks=args.ranks, redundant_experts=args.redundant,
                                seed=args.seed, **slots, **kw) as eng:
        print(f"  ready in {time.perf_counter() - t0:.1f} s; warm-up batch ...", flush=True)
        eng.generate(prompts, max_new_tokens=args.max_new_tokens, stop_token_ids=[])
        eng.wait_fallbacks()
        print(f"generating {len(prompts)} requests x {args.max_new_tokens} tokens; rank {args.kill} is killed "
              f"at step {args.at_step}", flush=True)
        eng.fail_rank(args.kill, how=args.how, at_step=args.at_step)
        t1 = time.perf_counter()
        outs = eng.generate(prompts, max_new_tokens=args.max_new_tokens, stop_token_ids=[], progress=not args.quiet)
        wall = time.perf_counter() - t1
        st = eng.stats()
    got = [o.token_ids for o in outs]
    print(f"\nrecovery timeline (epoch {st['epoch']}, alive ranks {st['alive_ranks']}):")
    for rec in st["recoveries"]:
        print(f"  failed ranks {rec['failed_ranks']}: detect {rec['detect_s'] * 1e3:.0f} ms, decide "
              f"{rec['decide_s'] * 1e3:.0f} ms, restore weights {rec['restore_s'] * 1e3:.0f} ms "
              f"({rec['moved_experts']} expert copies, {rec['restored_from_backup']} from the host backup), "
              f"compile {rec['compile_s'] * 1e3:.0f} ms, resume {rec['resume_s'] * 1e3:.0f} ms; "
              f"interruption {rec['total_s'] * 1e3:.0f} ms; {rec['requests_requeued']} requests re-queued")
    lost = sum(len(t) != args.max_new_tokens for t in got)
    same = got == want
    print(f"{len(got)} requests done in {wall:.1f} s, {lost} lost; tokens identical to the run with no "
          f"failure: {same}")
    return 0 if same and lost == 0 and st["recoveries"] else 1


def cmd_plan(args_list) -> int:
    from .bench.plan import main as plan_main
    return plan_main(args_list)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":
        return cmd_plan(argv[1:])
    if argv and argv[0] == "bench":
        from .bench import main as bench_main
        return bench_main(argv[1:])
    ap = argparse.ArgumentParser(prog="jem", description="jax-elastic-moe command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="batch generation with expert parallelism")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--config", default="small", help="preset name or YAML path (random weights)")
    src.add_argument("--model", help="Hugging Face checkpoint directory")
    g.add_argument("--ranks", type=positive_int, default=4)
    g.add_argument("--redundant", type=nonnegative_int, default=4)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--prompt", action="append", help="a prompt: text (with a tokenizer) or comma-separated ids")
    g.add_argument("--num-prompts", type=positive_int, default=8)
    g.add_argument("--prompt-len", type=positive_int, default=32)
    g.add_argument("--max-new-tokens", type=positive_int, default=32)
    g.add_argument("--seqs-per-rank", type=positive_int, default=8, help="KV-cache slots per rank (requests decoding at once)")
    g.add_argument("--max-model-len", type=positive_int, default=None,
                   help="positions per KV-cache slot, prompt + output (default: min(model limit, 1024))")
    g.add_argument("--temperature", type=finite_float, default=0.0)
    g.add_argument("--top-p", type=finite_float, default=1.0)
    g.add_argument("--seed", type=nonnegative_int, default=0)
    g.add_argument("--show", type=positive_int, default=4, help="print the first N outputs")
    g.add_argument("--json", help="write outputs and timing to this file")
    g.add_argument("--quiet", action="store_true")
    d = sub.add_parser("demo", help="the elastic demo: generation on N ranks with one killed mid-run")
    d.add_argument("--config", default="small")
    d.add_argument("--mode", default="mooncake", choices=[m.value for m in Mode])
    d.add_argument("--ranks", type=positive_int, default=4)
    d.add_argument("--redundant", type=nonnegative_int, default=8)
    d.add_argument("--kill", type=nonnegative_int, default=1, help="the rank to fail")
    d.add_argument("--how", default="kill", choices=[f.value for f in FailureKind])
    d.add_argument("--at-step", type=nonnegative_int, default=8)
    d.add_argument("--num-prompts", type=positive_int, default=8)
    d.add_argument("--prompt-len", type=positive_int, default=24)
    d.add_argument("--max-new-tokens", type=positive_int, default=24)
    d.add_argument("--seed", type=nonnegative_int, default=0)
    d.add_argument("--quiet", action="store_true")
    w = sub.add_parser("worker", help="run one rank of a multi-process engine whose controller is elsewhere")
    w.add_argument("--controller", required=True, help="tcp://HOST:PORT of the engine's control server")
    w.add_argument("--rank-range", required=True, help="ranks to run here, e.g. 4-7")
    w.add_argument("--host", default="127.0.0.1", help="this host's address for Mooncake")
    w.add_argument("--self-fence-after", type=float, default=None,
                   help="a rank exits after this many seconds without the controller's beacon (default: the "
                        "controller's heartbeat timeout)")
    sub.add_parser("plan", help="expert placement availability planner (see `jem plan --help`)")
    sub.add_parser("bench", help="benchmarks: throughput, overhead, recovery, kernels, placement (`jem bench --help`)")
    args = ap.parse_args(argv)
    commands = {"generate": cmd_generate, "demo": cmd_demo, "worker": cmd_worker}
    try:
        return commands[args.cmd](args)
    except (ValueError, TypeError) as e:        # settings the engine refused: one line, as argparse does
        print(f"jem {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def cmd_worker(args) -> int:
    """Starts the ranks of --rank-range on this host, each its own process, joined to the controller."""
    import subprocess
    lo, _, hi = args.rank_range.partition("-")
    ranks = range(int(lo), int(hi or lo) + 1)
    procs = [subprocess.Popen([sys.executable, "-m", "jax_elastic_moe.runtime.worker", "--controller",
                               args.controller, "--rank", str(r), "--host", args.host]
                              + (["--self-fence-after", str(args.self_fence_after)] if args.self_fence_after else []))
             for r in ranks]
    code = 1
    try:
        code = max(p.wait() for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        # leave with the ranks: no interpreter teardown of the jax this process imported (seconds on a
        # loaded host, while a host whose ranks are gone should look gone)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
