"""jem_exchange, the C++ FFI exchange through Mooncake, against its reference (the Python Transport
exchange) on real rank processes over loopback TCP: fuzzed shapes and dtypes, empty sends, inactive
ranks, ranks of both kinds in one exchange, a peer killed or stopped mid-run, a silent peer past the
deadline, fault injection, and the self-test / fallback."""
import os
import signal
import time
import warnings

import numpy as np
import pytest

pytest.importorskip("mooncake.engine", reason="needs the elastic extras: pip install 'jax-elastic-moe[elastic]'")

from jax_elastic_moe.runtime import exchange_ffi  # noqa: E402
from jax_elastic_moe.testing.loopback import LoopbackCluster  # noqa: E402
from jax_elastic_moe.runtime.transport import Transport  # noqa: E402
from runtime_support import bounded_test, ffi_required  # noqa: E402,F401 (autouse fixture)

os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
try:
    exchange_ffi.load()
except exchange_ffi.ExchangeUnavailable as e:  # pragma: no cover - depends on the build
    if ffi_required("cpu"):
        raise
    pytest.skip(f"native exchange unavailable: {e}", allow_module_level=True)

CHECK = "jax_elastic_moe.testing.exchange_check:"
TIMEOUT = 0.5
MARGIN = 0.4  # scheduling slack on 2 busy cores
SPEC = [((8,), "float32"), ((2,), "int32"), ((2,), "float16")]  # rows, slots, weights of a small MoE


def _start(cluster, ranks):
    assert cluster.install_peers(ranks) == {r: None for r in ranks}
    assert cluster.call_all(ranks, "invoke", wait=60, target=CHECK + "start_native") == {r: True for r in ranks}
    states = cluster.call_all(ranks, "invoke", wait=30, target=CHECK + "install_native")
    for rank, peers in states.items():
        assert all(peers[p][0] == "open" for p in ranks if p != rank), (rank, peers)


@pytest.fixture
def cluster4():
    with LoopbackCluster(4, lifetime_s=90, env={"JAX_PLATFORMS": "cpu"}) as cluster:
        _start(cluster, list(range(4)))
        yield cluster
    for pid in cluster.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _run(cluster, modes: dict, first_step: int, steps: int, wait: float = 60, **kwargs) -> dict:
    """Every rank of `modes` (rank -> python / callback / native) runs the same steps at once."""
    for rank, mode in modes.items():
        cluster.submit(rank, "invoke", target=CHECK + "run", mode=mode, first_step=first_step, steps=steps,
                       timeout=TIMEOUT, **kwargs)
    return {rank: cluster.collect(rank, wait) for rank in modes}


def _assert_ok(results, steps):
    for rank, out in results.items():
        assert out["failed"] == {} and out["bad"] == [] and out["steps"] == steps, (rank, out)


def test_matches_the_reference_on_fuzzed_shapes(cluster4):
    """Random token counts, row shapes (rank 2 to 5, the most a payload array allows), dtypes and per-destination row counts; the op's
    results equal what the inputs say each rank must receive, as the Python exchange's do."""
    rng = np.random.default_rng(12)
    dtypes = ["float32", "int32", "uint8", "float16", "int64"]
    step = 1
    for case in range(4):
        tokens = int(rng.integers(1, 17))
        spec = [(tuple(int(d) for d in rng.integers(1, 4, rng.integers(0, 4))), str(rng.choice(dtypes)))
                for _ in range(int(rng.integers(1, 4)))]
        for mode in ("native", "python"):
            results = _run(cluster4, {r: mode for r in range(4)}, step, 3, tokens=tokens, spec=spec, seed=case)
            _assert_ok(results, 3)
            step += 3


def test_ranks_of_both_kinds_understand_each_other(cluster4):
    """Ranks 0 and 2 run the op inside jit, ranks 1 and 3 the Python Transport: one wire format."""
    results = _run(cluster4, {0: "native", 1: "python", 2: "native", 3: "python"}, 1, 4, tokens=16, spec=SPEC)
    _assert_ok(results, 4)
    results = _run(cluster4, {0: "native", 1: "callback", 2: "native", 3: "native"}, 5, 2, tokens=16, spec=SPEC)
    _assert_ok(results, 2)


def test_empty_sends_and_an_inactive_rank(cluster4):
    results = _run(cluster4, {r: "native" for r in range(4)}, 1, 2, tokens=8, spec=SPEC, counts="empty")
    _assert_ok(results, 2)
    # rank 2 is not in the mask: it runs nothing, the others neither send to it nor wait for it
    active = [1, 1, 0, 1]
    results = _run(cluster4, {r: "native" for r in (0, 1, 3)}, 3, 3, tokens=8, spec=SPEC, active=active)
    _assert_ok(results, 3)
    results = _run(cluster4, {r: "native" for r in (0, 1, 3)}, 6, 1, tokens=8, spec=SPEC, active=active,
                   counts="full")
    _assert_ok(results, 1)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_dead_or_stopped_peer_mid_run_is_named_within_the_deadline(cluster4, how):
    """Back-to-back exchanges; rank 3 is SIGKILLed or SIGSTOPped. Each survivor's op returns an error
    naming rank 3 within the deadline (a killed rank: before it, by a failed write or probe, as
    direct evidence). Transfers left to a stopped rank are orphans until it is killed; the survivors
    then carry on among themselves."""
    for rank in range(4):
        cluster4.submit(rank, "invoke", target=CHECK + "run", mode="native", first_step=1, steps=100_000,
                        tokens=16, spec=SPEC, timeout=TIMEOUT, check=False)
    time.sleep(2.0)
    hit = cluster4.signal(3, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    for rank in range(3):
        out = cluster4.collect(rank, wait=TIMEOUT + 5)
        assert out["steps"] > 5, out
        assert 3 in out["failed"] and "rank 3" in out["message"], out
        detected = out["t_detect"] - hit
        assert detected < TIMEOUT + MARGIN, (rank, detected, out["failed"])
        if how == "kill":
            assert detected < TIMEOUT and 3 not in out["silent"], (rank, detected, out)
            assert "failed (" in out["message"], out["message"]
        else:
            assert "deadline" in out["failed"][3], out
    if how == "stop":
        cluster4.kill(3)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = cluster4.call_all(range(3), "invoke", target=CHECK + "native_state")
        if all(s["orphans"] == 0 for s in states.values()):
            break
        time.sleep(0.1)
    assert all(s["orphans"] == 0 for s in states.values()), states
    assert cluster4.install_peers([0, 1, 2]) == {0: None, 1: None, 2: None}
    cluster4.call_all(range(3), "invoke", target=CHECK + "install_native")
    results = _run(cluster4, {r: "native" for r in range(3)}, 10**6, 3, tokens=16, spec=SPEC, active=[1, 1, 1, 0])
    _assert_ok(results, 3)


def test_silent_peer_is_named_at_the_deadline(cluster4):
    """Rank 3 is alive but never enters the step: the others return at the op's deadline (never
    later) naming it silent, weak evidence; rank 3 stays open for them."""
    results = _run(cluster4, {r: "native" for r in range(3)}, 1, 1, tokens=8, spec=SPEC)
    for out in results.values():
        assert out["silent"] == [3] and "deadline" in out["failed"][3], out
        assert TIMEOUT <= out["elapsed"] < TIMEOUT + MARGIN, out
        assert "timed out" in out["message"], out["message"]
    states = cluster4.call_all(range(3), "invoke", target=CHECK + "native_state")
    assert all(s["peers"][3][0] == "open" for s in states.values()), states


def test_drop_injection_blames_the_dropping_rank(cluster4):
    assert cluster4.call(1, "fault", drop=True) is None
    cluster4.call(1, "invoke", target=CHECK + "install_native")
    results = _run(cluster4, {r: "native" for r in range(4)}, 1, 1, tokens=8, spec=SPEC)
    assert list(results[1]["failed"]) == [1] and "fault injection" in results[1]["failed"][1], results[1]
    for rank in (0, 2, 3):
        assert 1 in results[rank]["silent"], results[rank]


@pytest.mark.parametrize("mode", ["native", "python"])
def test_a_rank_of_an_old_epoch_is_never_counted(cluster4, mode):
    """Fencing: ranks 0, 1 and 3 move to epoch 2 without rank 2 (it was declared dead, say cut off);
    rank 2 comes back still in epoch 1 and runs a step, writing to all of them. Its signals arrive
    and are dropped and counted, the survivors' steps are exact, and rank 2 (which accepts only its
    own epoch) gets nothing from them."""
    cluster4.call_all(range(4), "invoke", target=CHECK + "set_epoch", epoch=1)
    _assert_ok(_run(cluster4, {r: mode for r in range(4)}, 1, 1, tokens=8, spec=SPEC), 1)
    survivors = [0, 1, 3]
    cluster4.call_all(survivors, "invoke", target=CHECK + "set_epoch", epoch=2)
    stale = _run(cluster4, {2: mode}, 2, 1, tokens=8, spec=SPEC, counts="full")[2]
    assert stale["steps"] == 0 and set(stale["silent"]) == {0, 1, 3}, stale
    results = _run(cluster4, {r: mode for r in survivors}, 2, 2, tokens=8, spec=SPEC, active=[1, 1, 0, 1])
    _assert_ok(results, 2)
    counts = cluster4.call_all(survivors, "invoke", target=CHECK + "stale_signals")
    assert all(c[mode] >= 1 for c in counts.values()), counts      # rank 2's signal, seen and dropped
    # back in the fold at epoch 3 (a rejoin): everyone is counted again
    cluster4.call_all(range(4), "invoke", target=CHECK + "set_epoch", epoch=3)
    _assert_ok(_run(cluster4, {r: mode for r in range(4)}, 4, 2, tokens=8, spec=SPEC), 2)


def test_self_test_and_fallback(monkeypatch):
    with Transport(0, 1, max_rows=4, row_bytes=64, meta_bytes=64) as transport:
        native = exchange_ffi.NativeExchange(transport)
        native.self_test()  # this process's Mooncake accepts the declared ABI
        with pytest.raises(exchange_ffi.ExchangeUnavailable, match="self-test failed"):
            native.self_test(timeout=0.5, segment="127.0.0.1:1")  # nothing listens there
        native.close()
        monkeypatch.setattr(exchange_ffi, "mooncake_version", lambda: "0.2.9")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert exchange_ffi.open_native_exchange(transport) is None
        assert any("using the Python exchange" in str(w.message) for w in caught)


def test_paused_peer_is_readmitted_once_its_orphans_resolve(cluster4):
    """Rank 3 is stopped for longer than the deadline, then continued (a long pause, not a death):
    the others abandon their writes to it as orphans and name it; after the pause Mooncake completes
    those writes, re-installing the peers drains them, and all four exchange again."""
    for rank in range(4):
        cluster4.submit(rank, "invoke", target=CHECK + "run", mode="native", first_step=1, steps=100_000,
                        tokens=16, spec=SPEC, timeout=TIMEOUT, check=False)
    time.sleep(2.0)
    cluster4.signal(3, signal.SIGSTOP)
    time.sleep(TIMEOUT + 0.3)
    os.kill(cluster4.procs[3].pid, signal.SIGCONT)
    outs = {rank: cluster4.collect(rank, wait=TIMEOUT + 5) for rank in range(4)}
    assert all(3 in outs[r]["failed"] for r in range(3)), outs
    assert cluster4.install_peers() == {r: None for r in range(4)}
    states = cluster4.call_all(range(4), "invoke", wait=30, target=CHECK + "install_native")
    for rank, peers in states.items():
        assert all(state == "open" and orphans == 0 for state, _, orphans in peers.values()), (rank, peers)
    results = _run(cluster4, {r: "native" for r in range(4)}, 10**6, 3, tokens=16, spec=SPEC)
    _assert_ok(results, 3)
