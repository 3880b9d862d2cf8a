"""The multi-process runtime on loopback: 4 worker processes, tiny preset, float32. Ranks are killed,
hung, made to drop their transfers, killed two at once and one after the other, killed beyond what
redundancy covers, and brought back; every surviving run must give the tokens of a run with no
failure. One engine serves the module at a time (EnginePool): each test starts from all 4 ranks
alive, so each passes alone and in any order."""
import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("mooncake.engine", reason="needs the elastic extras: pip install 'jax-elastic-moe[elastic]'")
pytest.importorskip("zmq")

import jax_elastic_moe as jem  # noqa: E402
from jax_elastic_moe.placement import validate  # noqa: E402
from jax_elastic_moe.runtime.controller import EngineDead  # noqa: E402
from runtime_support import ffi_required, time_limit  # noqa: E402

PROMPTS = [[3, 4, 5], [10, 20, 30, 40, 50, 60], [7], [100, 101], [9, 9, 9, 9], [42], [250, 3], [17, 18, 19]]
NEW = 10


# 2 KV-cache slots per rank (8 in all), chunks of at most 16 prompt tokens
KW = dict(seed=0, seqs_per_rank=2, max_model_len=128, prefill_chunk=16)
MIXED = [list(range(3, 3 + n)) for n in (5, 40, 2, 17, 9, 70, 1, 12, 26, 3, 55, 8)]
MIXED_NEW = [9, 3, 7, 1, 10, 4, 8, 6, 2, 9, 5, 3]


@pytest.fixture(scope="module")
def one_rank():
    with jem.Engine.from_config("tiny", num_ranks=1, **KW) as eng:
        yield eng


@pytest.fixture(scope="module")
def reference(one_rank):
    return [r.token_ids for r in one_rank.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=[])]


class EnginePool:
    """The module's 4-worker engine (starting 4 JAX workers costs tens of seconds here), handed to each
    test in a known state: every rank alive, no failure pending, not stopped. A test that leaves a
    rank dead gets it restarted for the next one; a test that failed, or left the engine stopped or a
    failure unfired, gets the engine replaced. So every test passes alone and in any order."""

    def __init__(self):
        self.eng, self.pids = None, []

    def acquire(self):
        eng = self.eng
        if eng is not None and (eng._loop.dead is not None or eng._loop._failures):
            self.discard()
        if self.eng is None:
            with time_limit(600, "starting 4 workers"):
                self.eng = jem.Engine.from_config("tiny", num_ranks=4, redundant_experts=8, mode="mooncake", **KW)
            self.pids += [w.pid for w in self.eng._runtime.workers.values()]
        for rank in np.nonzero(~self.eng.alive.astype(bool))[0].tolist():
            with time_limit(600, "restart"):
                self.eng.restart_rank(rank)          # compiles its programs before it takes part
            self.pids.append(self.eng._runtime.workers[rank].pid)
        assert self.eng.stats()["alive_ranks"] == [0, 1, 2, 3]
        return self.eng

    def discard(self):
        """Closes the engine and checks that every worker it ever had is gone, by pid."""
        if self.eng is None:
            return
        self.pids += [w.pid for w in self.eng._runtime.workers.values()]
        self.eng.close()
        self.eng = None
        time.sleep(0.5)
        for pid in self.pids:
            try:
                os.kill(pid, 0)
                alive = os.waitpid(pid, os.WNOHANG) == (0, 0)
            except (ProcessLookupError, ChildProcessError):
                alive = False
            if alive:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"worker {pid} outlived the engine")
        self.pids = []


@pytest.fixture(scope="module")
def pool():
    pool = EnginePool()
    try:
        yield pool
    finally:
        pool.discard()


@pytest.fixture
def engine(pool, request):
    """(engine, pids): the pool's engine with all 4 ranks alive; pids collects workers to check."""
    eng = pool.acquire()
    yield eng, pool.pids
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        pool.discard()                               # a failed test's engine is in an unknown state


def run(eng, limit=300):
    with time_limit(limit, "generate"):
        return [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=[])]


def last_recovery(eng):
    return eng.stats()["recoveries"][-1]


def test_no_failure_matches_one_device(engine, reference):
    eng, _ = engine
    if ffi_required("cpu"):                     # CI: the C++ op is built, so every worker uses it
        assert {w.exchange for w in eng._runtime.workers.values()} == {"native"}
    assert run(eng, 600) == reference
    with time_limit(600, "background compiles"):
        eng.wait_fallbacks()


def test_mixed_lengths_admitted_as_others_finish_without_compiling(engine, one_rank):
    eng, _ = engine
    want = [r.token_ids for r in one_rank.generate(MIXED, max_new_tokens=MIXED_NEW, stop_token_ids=[])]
    eng.generate(MIXED[:1], max_new_tokens=1)      # a step, so every worker has said how many programs it has
    programs = dict(eng._runtime.programs)
    assert programs and all(n == len(eng._scheduler.shapes()) for n in programs.values())
    with time_limit(300, "generate"):
        got = [r.token_ids for r in eng.generate(MIXED, max_new_tokens=MIXED_NEW, stop_token_ids=[])]
    assert got == want and [len(t) for t in got] == MIXED_NEW
    first = {r.id: r.token_times[0] for r in eng.last_requests}
    done = {r.id: r.token_times[-1] for r in eng.last_requests}
    late = [i for i in first if first[i] > min(done.values())]       # 12 requests, 8 slots
    assert late and any(done[j] > first[i] for i in late for j in done if j != i)
    assert eng._runtime.programs == programs, "a worker compiled after the warm-up"


def test_kill_during_chunked_prefill_keeps_the_survivors_caches(engine, one_rank):
    eng, pids = engine
    long = [list(range(4, 4 + n)) for n in (70, 55, 3, 64, 8, 41, 66, 2)]
    want = [r.token_ids for r in one_rank.generate(long, max_new_tokens=6, stop_token_ids=[])]
    pids.append(eng._runtime.workers[2].pid)
    eng.fail_rank(2, how="kill", at_step=2)        # the 55-70 token prompts take 4-5 chunks of 16
    with time_limit(300, "generate"):
        assert [r.token_ids for r in eng.generate(long, max_new_tokens=6, stop_token_ids=[])] == want
    rec = last_recovery(eng)
    assert rec["failed_ranks"] == [2] and rec["requests_requeued"] == 2 and rec["cache_kept"]
    assert rec["compile_s"] == 0 and rec["total_s"] < 5
    assert all(len(r.out) == 6 for r in eng.last_requests)


def test_kill_one_mid_generation(engine, reference):
    eng, pids = engine
    pids.append(eng._runtime.workers[1].pid)
    eng.fail_rank(1, how="kill", at_step=3)
    assert run(eng) == reference
    rec = last_recovery(eng)
    # 8 requests over 4 ranks: only rank 1's two are prefilled again, the others keep their cache
    assert rec["failed_ranks"] == [1] and rec["requests_requeued"] == 2 and rec["cache_kept"]
    assert eng.stats()["alive_ranks"] == [0, 2, 3]
    validate(eng.placement, eng.alive)


def test_rank_rejoins_and_takes_load(engine, reference):
    eng, pids = engine
    eng.fail_rank(1, how="kill")
    assert run(eng) == reference
    assert eng.stats()["alive_ranks"] == [0, 2, 3]
    with time_limit(600, "restart"):
        eng.restart_rank(1)
    pids.append(eng._runtime.workers[1].pid)
    assert eng.stats()["alive_ranks"] == [0, 1, 2, 3]
    assert (eng.placement.phy2log[:, 4:8] >= 0).any(), "the rejoined rank holds experts again"
    validate(eng.placement, eng.alive)
    assert run(eng, 600) == reference
    with time_limit(600, "background compiles"):
        eng.wait_fallbacks()


def test_hang_one(engine, reference):
    eng, pids = engine
    eng.fail_rank(3, how="hang", at_step=2)
    t = time.perf_counter()
    assert run(eng) == reference
    rec = last_recovery(eng)
    assert rec["failed_ranks"] == [3]
    assert rec["detect_s"] < 10.0, "a hung rank is caught by its heartbeat silence, not Mooncake's 30 s"
    assert time.perf_counter() - t < 120


def test_drop_one(engine, reference):
    eng, pids = engine
    eng.fail_rank(0, how="drop", at_step=2)
    assert run(eng) == reference
    assert last_recovery(eng)["failed_ranks"] == [0]


def test_kill_two_at_once(engine, reference):
    eng, pids = engine
    eng.fail_rank(1, how="kill", at_step=2)
    eng.fail_rank(2, how="kill", at_step=2)
    assert run(eng, 600) == reference
    assert last_recovery(eng)["failed_ranks"] == [1, 2]
    assert eng.stats()["alive_ranks"] == [0, 3]
    validate(eng.placement, eng.alive)


def test_kill_two_one_after_the_other(engine, reference):
    eng, pids = engine
    before = len(eng.stats()["recoveries"])
    eng.fail_rank(1, how="kill", at_step=2)
    eng.fail_rank(2, how="kill", at_step=6)
    assert run(eng, 600) == reference
    recs = eng.stats()["recoveries"][before:]
    assert [r["failed_ranks"] for r in recs] == [[1], [2]]
    assert eng.stats()["alive_ranks"] == [0, 3]


def test_kill_beyond_redundancy_stops_clearly(engine):
    eng, _ = engine
    # 2 ranks x 4 slots can hold the 8 experts; 1 rank's 4 slots cannot: a clear stop, no hang
    for rank in (1, 2, 3):
        eng.fail_rank(rank, how="kill", at_step=1)
    with time_limit(120, "generate past redundancy"):
        with pytest.raises(EngineDead, match="too few"):
            eng.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=[])
    with pytest.raises(EngineDead):
        eng.generate(PROMPTS, max_new_tokens=NEW)


def test_python_exchange_fallback_serves_through_a_kill(reference, monkeypatch):
    """Workers that cannot use the C++ op exchange through the Python Transport (io_callback): the
    same tokens, through a kill, with the epoch on every signal (3 workers, an engine of its own)."""
    monkeypatch.setenv("JEM_EXCHANGE", "python")                     # the spawned workers inherit it
    with time_limit(600, "3 workers, Python exchange"):
        with jem.Engine.from_config("tiny", num_ranks=3, redundant_experts=10, mode="mooncake", **KW) as eng:
            assert {w.exchange for w in eng._runtime.workers.values()} == {"python"}
            assert run(eng) == reference
            eng.fail_rank(2, how="kill", at_step=3)
            assert run(eng) == reference
            assert last_recovery(eng)["failed_ranks"] == [2] and eng.stats()["alive_ranks"] == [0, 1]
            assert eng.stats()["stale"]["messages"] == 0 and eng.stats()["stale"]["replies"] == 0


def test_a_command_of_another_epoch_is_refused_and_counted(engine, reference):
    """A weight commit sent in an epoch the worker is not in (a controller's stale message) is refused
    before it acts, counted, and serving goes on with the same tokens."""
    from jax_elastic_moe.runtime.control import message
    eng, _ = engine
    rt = eng._runtime
    before = eng.stats()["stale"]["messages"]
    with pytest.raises(RuntimeError, match=f"commit of epoch {rt.epoch - 1} refused: rank 0 is in epoch {rt.epoch}"):
        rt.fleet.command([0], lambda r: message("commit", id=rt.fleet.next_id(), epoch=rt.epoch - 1), timeout=60,
                         what="commit")
    assert run(eng) == reference
    assert eng.stats()["stale"]["messages"] == before + 1       # reported with rank 0's next step
