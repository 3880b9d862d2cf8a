"""One-process elastic recovery (mode spmd) against a full restart, measured in the same run.

  python benchmarks/recovery_spmd.py --config tiny --ranks 8 --redundant 8 --fail 1,2 [--json out.json]

For each failure count k: a batch generation with k ranks failed at decode step --at-step, without
and with precompiled fallback meshes; the recovery split into detect / placement (decide) / reshard
(restore) / compile / resume; tokens compared with a run without failure. The full restart is a new
process on the survivors: import JAX, build the engine, compile, first token."""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

RESTART = r"""
import time, sys
t0 = time.perf_counter()
import jax
jax.config.update("jax_num_cpu_devices", {ranks})
import jax_elastic_moe as jem
eng = jem.Engine.from_config({config!r}, num_ranks={ranks}, redundant_experts={redundant}, seed=0)
eng.generate({prompts!r}, max_new_tokens=1, stop_token_ids=[])
print("RESTART_S", time.perf_counter() - t0)
"""


def full_restart_s(config, ranks, redundant, prompts, env):
    code = RESTART.format(config=config, ranks=ranks, redundant=redundant, prompts=prompts)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    wall = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return wall, float(out.stdout.split("RESTART_S")[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--redundant", type=int, default=8)
    ap.add_argument("--fail", default="1,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--at-step", type=int, default=8)
    ap.add_argument("--cache-dir", help="also measure recovery with a warm persistent compilation cache here")
    ap.add_argument("--json")
    args = ap.parse_args()
    import jax
    jax.config.update("jax_num_cpu_devices", args.ranks)
    import numpy as np

    import jax_elastic_moe as jem
    rng = np.random.RandomState(0)
    prompts = [rng.randint(2, 200, size=rng.randint(4, 24)).tolist() for _ in range(args.batch)]
    with jem.Engine.from_config(args.config, num_ranks=args.ranks, redundant_experts=args.redundant) as eng:
        want = [r.token_ids for r in eng.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])]
    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    for k in [int(x) for x in args.fail.split(",")]:
        restart_wall, restart_s = full_restart_s(args.config, args.ranks, args.redundant, prompts, env)
        variants = [("none", False, None), ("precompiled", True, None)]
        if args.cache_dir:        # the persistent cache, warmed by an identical failure in an earlier engine
            variants.append(("persistent_cache", False, args.cache_dir))
        for variant, precompile, cache in variants:
            jax.clear_caches()                    # no program compiled by an earlier variant is reused
            if cache:
                with jem.Engine.from_config(args.config, num_ranks=args.ranks, redundant_experts=args.redundant,
                                            compilation_cache_dir=cache) as warm:
                    for r in range(k):
                        warm.fail_rank(1 + 2 * r, at_step=args.at_step)
                    warm.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])
                jax.clear_caches()
            with jem.Engine.from_config(args.config, num_ranks=args.ranks, redundant_experts=args.redundant,
                                        precompile_fallbacks=precompile, compilation_cache_dir=cache) as eng:
                eng.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])   # warm-up
                ready = eng.wait_fallbacks()
                for r in range(k):                    # k simultaneous failures
                    eng.fail_rank(1 + 2 * r, at_step=args.at_step)
                t = time.perf_counter()
                out = eng.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])
                wall = time.perf_counter() - t
                rec = eng.stats()["recoveries"][0]
                rows.append({"failed": k, "variant": variant, "precompiled_fallbacks": precompile, "fallback_meshes_ready": ready,
                             "outputs_identical": [o.token_ids for o in out] == want,
                             "requests_lost": sum(len(o.token_ids) != args.new_tokens for o in out),
                             "detect_s": rec["detect_s"], "placement_s": rec["decide_s"],
                             "reshard_s": rec["restore_s"], "compile_s": rec["compile_s"],
                             "resume_s": rec["resume_s"], "interruption_s": rec["total_s"],
                             "used_precompiled": rec["precompiled"], "experts_moved": rec["moved_experts"],
                             "restored_from_backup": rec["restored_from_backup"],
                             "restart_s": restart_s, "restart_wall_s": restart_wall,
                             "ratio": rec["total_s"] / restart_s, "generate_wall_s": wall})
    hdr = ("failed", "variant", "same", "lost", "detect", "place", "reshard", "compile", "resume", "interrupt",
           "restart", "ratio")
    print(f"{args.config}: {args.ranks} ranks, {args.redundant} redundant, batch {args.batch}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(" ".join(f"{h:>9}" for h in hdr))
    rows.sort(key=lambda r: (r["failed"], r["variant"]))
    for r in rows:
        vals = (r["failed"], r["variant"][:9], str(r["outputs_identical"]), r["requests_lost"],
                r["detect_s"], r["placement_s"], r["reshard_s"], r["compile_s"], r["resume_s"],
                r["interruption_s"], r["restart_s"], r["ratio"])
        print(" ".join(f"{v:>9.4f}" if isinstance(v, float) else f"{v:>9}" for v in vals))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "machine": platform.platform(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
