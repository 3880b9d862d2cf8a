"""The controller side of the multi-host tests (tests/test_multihost.py): run inside host 0's network
namespace, it builds a mooncake-mode engine whose workers (`jem worker`, started by the test in the
other hosts) connect over the namespaces' addresses, serves the prompts, applies one fault when the
engine has made `at_step` steps, and prints one JSON line: the tokens, the recovery records, the
error if generate failed, and the fault's timing.

    python multihost_driver.py SPEC_JSON

SPEC: endpoint, ranks, redundant, prompts, new_tokens, heartbeat_timeout, exchange_timeout,
hosts (namespace names), fault: {action: kill | cut | none, host, at_step, hold_s, serve_after_restore}.
serve_after_restore: after a cut is restored, keep serving the prompts (up to 60 s) until the cut
host's fenced workers have been heard from and told to exit; records the stale counts."""
from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax_elastic_moe as jem  # noqa: E402
from netns_hosts import NetnsHosts  # noqa: E402

KW = dict(seed=0, seqs_per_rank=2, max_model_len=64, prefill_chunk=16)


def main(spec: dict) -> dict:
    hosts = NetnsHosts.attach(spec["hosts"])
    out: dict = {}
    eng = jem.Engine.from_config("tiny", num_ranks=spec["ranks"], redundant_experts=spec["redundant"],
                                 mode="mooncake", spawn_workers=False, controller_endpoint=spec["endpoint"],
                                 heartbeat_timeout=spec["heartbeat_timeout"],
                                 exchange_timeout=spec["exchange_timeout"], **KW)
    fault = spec["fault"]
    try:
        eng.generate(spec["prompts"][:2], max_new_tokens=2, stop_token_ids=[])      # warm-up: compiles
        steps0 = len(eng.step_log)

        def apply_fault():
            while len(eng.step_log) < steps0 + fault["at_step"]:
                time.sleep(0.002)
            out["fault_at"] = time.perf_counter()
            if fault["action"] == "kill":
                hosts.kill(fault["host"])
            elif fault["action"] == "cut":
                hosts.cut(fault["host"])
                time.sleep(fault["hold_s"])
                hosts.restore(fault["host"])
                out["restored_at"] = time.perf_counter()
        t = threading.Thread(target=apply_fault, daemon=True)
        if fault["action"] != "none":
            t.start()
        try:
            res = eng.generate(spec["prompts"], max_new_tokens=spec["new_tokens"], stop_token_ids=[])
            out["tokens"] = [r.token_ids for r in res]
        except Exception as e:          # the user's view: what generate raised
            out["error"] = f"{type(e).__name__}: {e}"
        out["ended_at"] = time.perf_counter()
        if t.is_alive():
            t.join(timeout=fault.get("hold_s", 0) + 10)
        if fault.get("serve_after_restore") and "tokens" in out:
            out["after_restore_identical"] = True
            limit = time.monotonic() + 60
            while eng.stats()["stale"]["fenced_told_to_exit"] == 0 and time.monotonic() < limit:
                again = [r.token_ids for r in eng.generate(spec["prompts"], max_new_tokens=spec["new_tokens"],
                                                           stop_token_ids=[])]
                out["after_restore_identical"] &= again == out["tokens"]
            out["told_at"] = time.perf_counter()
            limit = time.monotonic() + 15         # before close(), whose shutdown would end them anyway
            while hosts.pids(fault["host"]) and time.monotonic() < limit:
                time.sleep(0.05)
            if not hosts.pids(fault["host"]):
                out["fenced_gone_at"] = time.perf_counter()
        stats = eng.stats()
        out["stale"] = stats.get("stale")
        out["recoveries"] = [{k: v for k, v in r.items() if isinstance(v, (int, float, str, list, bool, type(None)))}
                             for r in stats["recoveries"]]
        out["transient_retries"] = eng._loop.transient_retries
        out["live"] = list(eng._runtime.live)
    finally:
        eng.close()
    return out


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
