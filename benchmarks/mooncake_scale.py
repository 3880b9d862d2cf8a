"""mooncake mode at many ranks on one host: start, serve, one kill; worker RSS sampled every second.

  python benchmarks/mooncake_scale.py --ranks 32 --redundant 256 --exchange-timeout 1.0 --json out.json

Builds `Engine.from_config(--config, mode="mooncake")`, runs two generates of --prompts prompts
(8 tokens, --new-tokens each; the gaps between engine steps are logged), then kills rank --kill at
engine step 3 of a third and compares its tokens with the second's. Any exception is recorded (and
the engine closed), so a run that cannot serve still reports how far it got, when, and the RSS."""
import argparse
import json
import logging
import os
import threading
import time

import jax_elastic_moe as jem
from jax_elastic_moe.bench.common import run_start_record, synthetic_prompts
from jax_elastic_moe.runtime.processes import stat_fields


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny_deepseek_256")
    ap.add_argument("--ranks", type=int, default=32)
    ap.add_argument("--redundant", type=int, default=256)
    ap.add_argument("--exchange-timeout", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--kill", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0, events, peak, stop = time.time(), [], {}, threading.Event()

    def log(what, **kw):
        events.append({"t_s": round(time.time() - t0, 1), "load": os.getloadavg()[0], "what": what, **kw})
        print(json.dumps(events[-1]), flush=True)

    def children() -> list[int]:
        """This process's children: the workers (whatever the engine's internals)."""
        me = str(os.getpid())
        return [int(pid) for pid in filter(str.isdigit, os.listdir("/proc"))
                if (stat_fields(f"/proc/{pid}/stat") or [None, None])[1] == me]

    def sample_rss():
        while not stop.is_set():
            for pid in children():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        kb = int(next(x for x in f if x.startswith("VmRSS")).split()[1])
                    peak[pid] = max(peak.get(pid, 0), kb)
                except (OSError, StopIteration):
                    pass
            time.sleep(1)
    threading.Thread(target=sample_rss, daemon=True).start()
    record = run_start_record()
    log("building engine")
    eng = None
    try:
        eng = jem.Engine.from_config(args.config, num_ranks=args.ranks, redundant_experts=args.redundant,
                                     mode="mooncake", exchange_timeout=args.exchange_timeout,
                                     seqs_per_rank=max(1, -(-args.prompts // (args.ranks - 2))),
                                     max_model_len=8 + args.new_tokens)
        log("engine up", effective_exchange_timeout=eng._runtime.exchange_timeout)
        prompts = synthetic_prompts(args.prompts, 8, eng.cfg.vocab_size, 0)
        for i in range(2):
            first = len(eng.step_log)
            out = eng.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])
            log(f"generate {i}", transient_retries=eng.transient_retries,
                step_gaps_s=[round(b[0] - a[0], 3) for a, b in zip(eng.step_log[first:], eng.step_log[first + 1:])])
        want = [o.token_ids for o in out]
        eng.fail_rank(args.kill, at_step=3)
        out = eng.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])
        log("after a kill", same=[o.token_ids for o in out] == want, recovery=eng.stats()["recoveries"][-1])
    except Exception as e:  # noqa: BLE001  (the report says how far it got)
        log("failed", error=f"{type(e).__name__}: {e}"[:3000])
    finally:
        stop.set()
        if eng is not None:
            eng.close()
    per_worker = [v / 1024 for v in peak.values()]
    result = {"machine": record, "settings": vars(args), "events": events,
              "rss_peak_mb": {"max_per_worker": max(per_worker, default=None), "sum": sum(per_worker)}}
    print(json.dumps(result["rss_peak_mb"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
