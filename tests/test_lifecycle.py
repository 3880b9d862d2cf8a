"""Failures outside the step, in the multi-process runtime: an engine built in a short-lived thread
keeps its workers; a worker killed while the workers compile is recovered from with identical
tokens; restart_rank works from another thread; an engine dropped without close() stops its
workers. One engine, the checks in order (each needs the state the previous one left)."""
import gc
import os
import threading
import time

import pytest

pytest.importorskip("mooncake.engine", reason="needs the elastic extras: pip install 'jax-elastic-moe[elastic]'")
pytest.importorskip("zmq")

import jax_elastic_moe as jem  # noqa: E402
from runtime_support import time_limit  # noqa: E402

PROMPTS = [[3, 4, 5], [10, 20, 30, 40, 50, 60], [7], [100, 101], [9, 9, 9, 9], [42], [250, 3], [17, 18, 19]]
KW = dict(seed=0, seqs_per_rank=2, max_model_len=64, prefill_chunk=16)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except (ProcessLookupError, ChildProcessError):
        return False


def in_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.update(out=fn()))
    t.start()
    t.join()
    return box.get("out")


def test_thread_built_engine_kill_during_compile_restart_from_thread_and_drop():
    with jem.Engine.from_config("tiny", num_ranks=1, **KW) as one:
        want = [r.token_ids for r in one.generate(PROMPTS, max_new_tokens=6, stop_token_ids=[])]
    with time_limit(600, "starting 4 workers in a thread"):
        eng = in_thread(lambda: jem.Engine.from_config("tiny", num_ranks=4, redundant_experts=8, mode="mooncake",
                                                       **KW))
    pids = [w.pid for w in eng._runtime.workers.values()]
    try:
        time.sleep(1.0)                                   # the building thread has ended
        assert all(alive(p) for p in pids), "workers died with the thread that started them"

        # the first generate compiles every step shape on every worker: kill rank 2 in the middle
        def kill_when_compiling(e=eng):
            time.sleep(1.0)
            e.fail_rank(2, how="kill")
        killer = threading.Thread(target=kill_when_compiling)
        killer.start()
        t = time.perf_counter()
        with time_limit(300, "generate"):
            got = [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=6, stop_token_ids=[])]
        killer.join()
        assert got == want
        rec = eng.stats()["recoveries"][0]
        assert rec["failed_ranks"] == [2] and "compile" in rec["evidence"]
        assert time.perf_counter() - t < 120

        with time_limit(600, "restart from a thread"):
            in_thread(lambda e=eng: e.restart_rank(2))
        pids.append(eng._runtime.workers[2].pid)
        time.sleep(1.0)
        assert eng.stats()["alive_ranks"] == [0, 1, 2, 3] and alive(pids[-1])
        with time_limit(300, "generate"):
            assert [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=6, stop_token_ids=[])] == want
    except BaseException:
        eng.close()
        raise
    live = [p for p in pids if alive(p)]
    t = time.monotonic()
    del eng, killer, kill_when_compiling      # the function holds the engine as its default argument
    gc.collect()
    while any(alive(p) for p in live) and time.monotonic() < t + 10:
        time.sleep(0.05)
    took = time.monotonic() - t
    left = [p for p in live if alive(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, f"workers {left} outlived their dropped engine"
    # prompt, not a speed: 0.27-0.5 s alone (2026-11-29), 2.1 s once in the full random-order suite
    # (cause not established; other work of the same process on the 2 cores); lingering ones take 10 s+
    assert took < 5.0, f"the dropped engine's workers took {took:.1f} s to stop"
