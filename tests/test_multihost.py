"""Several hosts for real: network namespaces as hosts (tests/netns_hosts.py). Host 0 runs the
controller (tests/multihost_driver.py), hosts 1-3 run `jem worker` for two ranks each; Mooncake and
the control plane go over the namespaces' own addresses. Faults: a whole host killed, a host's link
cut for less or more than the heartbeat timeout (also with its workers' self-fencing held off), the
controller's host cut. Needs root and `ip`; skipped with
the reason elsewhere (CI runs as root)."""
import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("mooncake.engine", reason="needs the elastic extras: pip install 'jax-elastic-moe[elastic]'")

import netns_hosts  # noqa: E402

why = netns_hosts.available()
pytestmark = pytest.mark.skipif(why is not None, reason=f"network namespaces: {why}")

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS_PER_HOST, WORKER_HOSTS = 2, 3
PORT = 29500
HB_TIMEOUT = 3.0
PROMPTS = [[3, 4, 5], [10, 20, 30, 40, 50, 60], [7], [100, 101], [9, 9, 9, 9], [42], [250, 3], [17, 18, 19],
           [5, 6], [77, 78, 79], [1, 2, 3, 4, 5], [200]]
NEW = 12


def reference_tokens():
    """The tokens of a one-device run with no failure (the driver's settings)."""
    sys.path.insert(0, HERE)
    import jax_elastic_moe as jem
    from multihost_driver import KW
    with jem.Engine.from_config("tiny", num_ranks=1, **KW) as eng:
        return [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=[])]


@pytest.fixture(scope="module")
def reference():
    return reference_tokens()


def serve(fault: dict, timeout: float = 420, worker_args: dict | None = None):
    """Hosts 0 (controller) + 3 worker hosts; runs the driver with `fault`; returns its result, with
    gone_at: worker host -> when its processes were all gone (while the controller still ran).
    worker_args: host -> extra `jem worker` arguments."""
    with netns_hosts.NetnsHosts(1 + WORKER_HOSTS) as hosts:
        endpoint = f"tcp://{hosts.addrs[0]}:{PORT}"
        env = dict(os.environ, JAX_PLATFORMS="cpu", MC_LOG_LEVEL="ERROR",
                   XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        for h in range(1, 1 + WORKER_HOSTS):
            lo = (h - 1) * RANKS_PER_HOST
            hosts.popen(h, [sys.executable, "-m", "jax_elastic_moe.cli", "worker", "--controller", endpoint,
                            "--rank-range", f"{lo}-{lo + RANKS_PER_HOST - 1}", "--host", hosts.addrs[h],
                            *(worker_args or {}).get(h, [])],
                        env=env, stdin=subprocess.DEVNULL)
        spec = dict(endpoint=endpoint, ranks=RANKS_PER_HOST * WORKER_HOSTS, redundant=10, prompts=PROMPTS,
                    new_tokens=NEW, heartbeat_timeout=HB_TIMEOUT, exchange_timeout=1.0, hosts=hosts.names,
                    fault=fault)
        driver = hosts.popen(0, [sys.executable, os.path.join(HERE, "multihost_driver.py"), json.dumps(spec)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        gone_at = {}          # worker host -> time.perf_counter() when its last process was seen gone
        deadline = time.monotonic() + timeout
        while driver.poll() is None and time.monotonic() < deadline:
            for h in range(1, 1 + WORKER_HOSTS):
                if h not in gone_at and not hosts.pids(h):
                    gone_at[h] = time.perf_counter()
            time.sleep(0.1)
        try:
            stdout, stderr = driver.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hosts.kill(0)
            raise AssertionError(f"the controller did not finish within {timeout} s (fault {fault})")
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, f"the driver printed no result (exit {driver.returncode}):\n{stderr[-3000:]}"
        result = json.loads(lines[-1][len("RESULT "):])
        result["gone_at"] = gone_at
        timing = {"fault": fault, "error": result.get("error", "")[:120],
                  "recoveries": [{k: r[k] for k in ("failed_ranks", "detect_s", "restore_s", "total_s")}
                                 for r in result.get("recoveries", [])],
                  "resumed_after_fault_s": [r["resumed_at"] - result["fault_at"] for r in result.get("recoveries", [])],
                  "hosts_emptied_after_fault_s": {h: t - result["fault_at"] for h, t in gone_at.items()},
                  "transient_retries": result.get("transient_retries"), "stale": result.get("stale")}
        print("MULTIHOST " + json.dumps(timing))     # the measured table of docs/RUNTIME.md (pytest -s)
        return result


def test_host_killed_is_served_with_identical_tokens(reference):
    result = serve(dict(action="kill", host=2, at_step=3))
    assert "error" not in result, result["error"]
    assert result["tokens"] == reference
    (rec,) = result["recoveries"]
    assert sorted(rec["failed_ranks"]) == [2, 3]
    assert result["live"] == [0, 1, 4, 5]


def test_short_partition_is_not_a_failure(reference):
    # cut for a third of the heartbeat timeout: a step may time out and run again, nobody is declared dead
    result = serve(dict(action="cut", host=1, at_step=3, hold_s=HB_TIMEOUT / 3))
    assert "error" not in result, result["error"]
    assert result["tokens"] == reference
    assert result["recoveries"] == [] and result["live"] == list(range(6))


def test_controller_host_cut_ends_every_worker_and_generate_fails_clearly():
    result = serve(dict(action="cut", host=0, at_step=3, hold_s=HB_TIMEOUT + 6))
    assert "tokens" not in result and "EngineDead" in result["error"], result
    assert sorted(result["gone_at"]) == [1, 2, 3], f"workers still running on hosts {result['gone_at']}"
    slowest = max(result["gone_at"].values()) - result["fault_at"]
    assert slowest <= HB_TIMEOUT + 2.0, f"the last worker host emptied {slowest:.1f} s after the cut"


def test_partition_past_the_timeout_is_a_failure_and_the_cut_host_fences_itself(reference):
    hold = HB_TIMEOUT + 5
    result = serve(dict(action="cut", host=1, at_step=3, hold_s=hold))
    assert "error" not in result, result["error"]
    assert result["tokens"] == reference
    (rec,) = result["recoveries"]
    assert sorted(rec["failed_ranks"]) == [0, 1] and result["live"] == [2, 3, 4, 5]
    # detected within the heartbeat timeout plus a step, and served again right after (the recovery
    # itself takes a fraction of a second): the first good step comes within the timeout + 2 s
    assert rec["resumed_at"] - result["fault_at"] <= HB_TIMEOUT + 2.0, rec
    # the cut-off host's workers lost the controller too and exited before the link came back: nothing
    # stale is left to write into the survivors' buffers of the new epoch
    assert 1 in result["gone_at"] and result["gone_at"][1] - result["fault_at"] <= HB_TIMEOUT + 2.0
    assert result["gone_at"][1] < result["fault_at"] + hold


def test_cut_off_host_that_did_not_fence_itself_is_never_counted_and_is_told_to_exit(reference):
    # host 1's workers wait 120 s for the controller's beacon (as if their own fencing were stuck), so
    # after the link comes back they are alive in the old epoch: the controller has fenced them (their
    # incarnation and epoch are no longer counted) and tells them to exit when it hears from them
    hold = HB_TIMEOUT + 3
    result = serve(dict(action="cut", host=1, at_step=3, hold_s=hold, serve_after_restore=True),
                   worker_args={1: ["--self-fence-after", "120"]})
    assert "error" not in result, result["error"]
    assert result["tokens"] == reference and result["after_restore_identical"] is True
    (rec,) = result["recoveries"]
    assert sorted(rec["failed_ranks"]) == [0, 1] and result["live"] == [2, 3, 4, 5]
    # they were heard from (their heartbeats arrived and were dropped) and told to exit
    assert result["stale"]["heartbeats"] >= 1 and result["stale"]["fenced_told_to_exit"] >= 1, result["stale"]
    assert "fenced_gone_at" in result, "the fenced workers of host 1 still ran 15 s after they were told to exit"
    assert result["restored_at"] < result["fenced_gone_at"]
