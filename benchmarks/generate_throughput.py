"""Generate throughput (tokens/s) of a preset on N fake CPU devices.

  python benchmarks/generate_throughput.py --config small --ranks 4 --redundant 4
Warm-up run first (compilation), then timed runs of the same workload."""
import argparse
import json
import platform
import time

import jax


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json")
    args = ap.parse_args()
    jax.config.update("jax_num_cpu_devices", args.ranks)
    import numpy as np

    import jax_elastic_moe as jem
    eng = jem.Engine.from_config(args.config, num_ranks=args.ranks, redundant_experts=args.redundant,
                                 dtype=args.dtype, seed=0)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(2, eng.cfg.vocab_size, size=args.prompt_len).tolist() for _ in range(args.batch)]
    t = time.perf_counter()
    eng.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])
    warm = time.perf_counter() - t
    rates = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        outs = eng.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])
        dt = time.perf_counter() - t
        rates.append(sum(len(o.token_ids) for o in outs) / dt)
    row = {"config": args.config, "ranks": args.ranks, "redundant": args.redundant, "batch": args.batch,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "dtype": args.dtype,
           "tokens_per_s_mean": float(np.mean(rates)), "tokens_per_s_min": float(np.min(rates)),
           "tokens_per_s_max": float(np.max(rates)), "first_run_s_with_compile": warm,
           "machine": f"{platform.machine()} {jax.devices()[0].platform} x{len(jax.devices())}"}
    print(f"{args.config}: {args.ranks} ranks, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens: {row['tokens_per_s_mean']:.1f} tokens/s "
          f"(min {row['tokens_per_s_min']:.1f}, max {row['tokens_per_s_max']:.1f}); first run with "
          f"compilation {warm:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
