"""`jem`: the command line. Subcommands: generate, plan (placement planner), bench (benchmarks)."""
from __future__ import annotations

import argparse
import json
import sys
import time


def cmd_generate(args) -> int:
    from .bench.common import synthetic_prompts, use_cpu_devices
    use_cpu_devices(args.ranks)
    import jax_elastic_moe as jem
    kw = dict(num_ranks=args.ranks, redundant_experts=args.redundant, dtype=args.dtype)
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


def cmd_plan(args_list) -> int:
    from .placement.planner import main as plan_main
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
    g.add_argument("--ranks", type=int, default=4)
    g.add_argument("--redundant", type=int, default=4)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--prompt", action="append", help="a prompt: text (with a tokenizer) or comma-separated ids")
    g.add_argument("--num-prompts", type=int, default=8)
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--show", type=int, default=4, help="print the first N outputs")
    g.add_argument("--json", help="write outputs and timing to this file")
    g.add_argument("--quiet", action="store_true")
    sub.add_parser("plan", help="expert placement availability planner (see `jem plan --help`)")
    sub.add_parser("bench", help="benchmarks: throughput, overhead, recovery, kernels, placement (`jem bench --help`)")
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        return cmd_generate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
