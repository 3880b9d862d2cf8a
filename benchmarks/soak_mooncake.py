"""No false failure detection under steady load: the multi-process engine generates batch after batch
for --seconds on this machine with the default timeouts; every recovery or re-run step is counted.

  python benchmarks/soak_mooncake.py --seconds 120 [--config small] [--ranks 4]"""
import argparse
import json
import os
import time

import numpy as np

import jax_elastic_moe as jem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = np.random.RandomState(0)
    with jem.Engine.from_config(args.config, num_ranks=args.ranks, redundant_experts=args.redundant,
                                mode="mooncake") as eng:
        prompts = [rng.randint(2, eng.cfg.vocab_size, size=rng.randint(8, 32)).tolist() for _ in range(args.batch)]
        eng.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])
        eng.wait_fallbacks()
        t0, batches, tokens = time.perf_counter(), 0, 0
        while time.perf_counter() - t0 < args.seconds:
            outs = eng.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])
            batches += 1
            tokens += sum(len(o.token_ids) for o in outs)
        wall = time.perf_counter() - t0
        st = eng.stats()
        hb = max(eng._runtime.fleet.monitor.health(r).max_gap for r in st["alive_ranks"])
    row = {"seconds": wall, "batches": batches, "tokens": tokens, "tokens_per_s": tokens / wall,
           "recoveries": len(st["recoveries"]), "transient_retries": st["transient_retries"],
           "alive_ranks": st["alive_ranks"], "max_heartbeat_gap_s": hb, "load_avg": os.getloadavg(),
           "settings": vars(args)}
    print(f"{wall:.0f} s of steady load: {batches} batches, {tokens} tokens ({tokens / wall:.1f} tokens/s); "
          f"false recoveries: {row['recoveries']}, steps re-run after a timeout: {row['transient_retries']}; "
          f"longest heartbeat gap {hb:.2f} s; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
