"""Mooncake transport: region layout, argument checking, and real rank processes on loopback TCP
(all-to-all data integrity, killed / hung / dropping / slow / restarted peers, weight reads)."""
import os
import signal
import threading
import time
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("mooncake.engine", reason="needs the elastic extras: pip install 'jax-elastic-moe[elastic]'")

from jax_elastic_moe.runtime.layout import (HEADER_BYTES, MAX_ARRAYS, PayloadError, RegionLayout,  # noqa: E402
                                            aligned_buffer, pack_payload, unpack_payload)
from jax_elastic_moe.testing.loopback import LoopbackCluster, make_payload, payload_digest  # noqa: E402
from jax_elastic_moe.runtime.transport import FaultInjectingTransport, PeerAddress, PeerFailure, Transport  # noqa: E402
from runtime_support import bounded_test  # noqa: E402,F401 (autouse fixture)

os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
TIMEOUT = 0.5  # exchange deadline of these tests (the default)
MARGIN = 0.4  # scheduling slack on 2 busy cores


# ----------------------------------------------------------------------------------------- layout


def test_layout_offsets_are_disjoint_and_aligned():
    layout = RegionLayout(num_ranks=4, max_rows=8, row_bytes=100, meta_bytes=30, buffers_per_source=2)
    spans = []
    for src in range(4):
        spans.append((layout.probe_offset(src), 8))
        for seq in (1, 2):
            spans.append((layout.signal_offset(src, seq), 8))
            spans.append((layout.slot_offset(src, seq), layout.slot_bytes))
    spans.sort()
    assert all(off % 64 == 0 for off, _ in spans)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))
    assert spans[-1][0] + spans[-1][1] == layout.region_bytes
    assert layout.slot_offset(2, 3) == layout.slot_offset(2, 5) != layout.slot_offset(2, 4)
    assert layout.slot_bytes >= HEADER_BYTES + 8 * 100 + 30
    with pytest.raises(ValueError, match="source rank 4 out of range"):
        layout.slot_offset(4, 1)
    with pytest.raises(ValueError, match="max_rows must be a positive int"):
        RegionLayout(4, 0, 100, 30)
    with pytest.raises(ValueError, match=r"seq must be in \[1, 2\*\*63\)"):
        layout.signal_offset(0, 0)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 8), cols=st.integers(1, 16), n_meta=st.integers(0, 5), seq=st.integers(1, 2**63 - 1),
       dtype=st.sampled_from([np.float32, np.uint16, ml_dtypes.bfloat16, np.float16]))
def test_pack_unpack_roundtrip(rows, cols, n_meta, seq, dtype):
    layout = RegionLayout(num_ranks=2, max_rows=8, row_bytes=16 * 4, meta_bytes=64)
    slot = aligned_buffer(layout.slot_bytes)
    data = (np.arange(rows * cols) % 97).astype(dtype).reshape(rows, cols)
    arrays = [data, np.arange(n_meta, dtype=np.int32), np.array(rows, dtype=np.int64)]
    used = pack_payload(slot, layout, seq, arrays)
    assert HEADER_BYTES <= used <= layout.slot_bytes
    out = unpack_payload(slot, layout, seq)
    assert [(a.dtype, a.shape) for a in out] == [(a.dtype, a.shape) for a in arrays]
    assert all(np.array_equal(a, b) for a, b in zip(out, arrays))
    assert np.shares_memory(out[0], slot) or out[0].size == 0
    assert not np.shares_memory(unpack_payload(slot, layout, seq, copy=True)[1], slot)


def test_payload_errors_name_the_problem():
    layout = RegionLayout(num_ranks=2, max_rows=4, row_bytes=16, meta_bytes=8)
    slot = aligned_buffer(layout.slot_bytes)
    with pytest.raises(PayloadError, match="exceeds the slot capacity"):
        pack_payload(slot, layout, 1, [np.zeros((4, 4), np.float32), np.zeros(200, np.int32)])
    with pytest.raises(PayloadError, match="dtype complex64"):
        pack_payload(slot, layout, 1, [np.zeros(2, np.complex64)])
    with pytest.raises(PayloadError, match="at most 8"):
        pack_payload(slot, layout, 1, [np.zeros(1, np.int8)] * (MAX_ARRAYS + 1))
    with pytest.raises(PayloadError, match="sequence of numpy arrays"):
        pack_payload(slot, layout, 1, np.zeros(3))
    with pytest.raises(PayloadError, match="must be a numpy array"):
        pack_payload(slot, layout, 1, [[1, 2]])
    pack_payload(slot, layout, 7, [np.ones((4, 4), np.float32)])
    with pytest.raises(PayloadError, match="carries seq 7, expected 9"):
        unpack_payload(slot, layout, 9)
    slot[:8] = 0
    with pytest.raises(PayloadError, match="bad magic"):
        unpack_payload(slot, layout, 7)


# ----------------------------------------------------------------------------- in-process Transport


@pytest.fixture
def pair():
    """Two Transports in this process (ranks 0 and 1 of 2), connected; rank 0 can inject faults."""
    a = FaultInjectingTransport(0, 2, max_rows=8, row_bytes=64, meta_bytes=64, weights_bytes=1 << 16)
    b = Transport(1, 2, max_rows=8, row_bytes=64, meta_bytes=64, weights_bytes=1 << 16)
    try:
        table = {0: a.address, 1: b.address.to_dict()}
        a.set_peers(table)
        b.set_peers(table)
        yield a, b
    finally:  # Mooncake's engine teardown takes ~1 s; both at once
        closers = [threading.Thread(target=t.close) for t in (a, b)]
        for thread in closers:
            thread.start()
        for thread in closers:
            thread.join(10)


def test_bad_arguments_give_clear_errors(pair):
    a, b = pair
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        Transport(2, 2, max_rows=8, row_bytes=64, meta_bytes=64)
    with pytest.raises(ValueError, match="protocol must be 'tcp' or 'rdma'"):
        Transport(0, 2, max_rows=8, row_bytes=64, meta_bytes=64, protocol="udp")
    with pytest.raises(ValueError, match="delay_s"):
        a.set_fault(delay_s=-1)
    with pytest.raises(TypeError, match="drop must be a bool"):
        a.set_fault(drop=1)
    assert not hasattr(b, "set_fault"), "a plain Transport has no fault injection in its data path"
    with pytest.raises(ValueError, match="dest must be a rank"):
        a.send(5, [], seq=1)
    with pytest.raises(ValueError, match="seq must be in"):
        a.send(1, [], seq=0)
    with pytest.raises(PayloadError, match="exceeds the slot capacity"):
        a.send(1, [np.zeros((20, 16), np.float32)], seq=1)
    other = b.address.to_dict() | {"layout": [2, 9, 64, 64, 2]}
    with pytest.raises(ValueError, match="rank 1 has region layout"):
        a.set_peers({1: other})
    with pytest.raises(ValueError, match="is not this Transport's address"):
        a.set_peers({0: b.address.to_dict() | {"rank": 0}})
    with pytest.raises(ValueError, match="missing field"):
        a.set_peers({1: {"rank": 1}})
    with pytest.raises(ValueError, match="holds the address of rank 0"):
        a.set_peers({1: a.address})
    assert PeerAddress.from_dict(a.address.to_dict()) == a.address
    with pytest.raises(ValueError, match="not inside memory registered"):
        a.read(1, 0, 16, np.zeros(16, np.uint8))
    with pytest.raises(ValueError, match="outside rank 1's weights region"):
        a.read(1, (1 << 16) - 8, 16, a.weights[:16])
    a.set_peers({0: a.address})  # a table without rank 1
    with pytest.raises(ValueError, match="no address installed for rank 1"):
        a.send(1, [], seq=1)


def test_in_process_exchange_self_send_and_weights(pair):
    a, b = pair
    rows = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    ha = [a.send(0, [rows], seq=5), a.send(1, [rows * 2, np.array([5], np.int32)], seq=5)]
    hb = [b.send(0, [rows * 3], seq=5), b.send(1, [], seq=5)]
    assert a.wait_sends(ha).ok and b.wait_sends(hb).ok
    got_a = a.recv([0, 1], seq=5, deadline=time.monotonic() + 1).raise_for_failures().payloads
    got_b = b.recv([0, 1], seq=5, deadline=time.monotonic() + 1).raise_for_failures().payloads
    assert np.array_equal(got_a[0][0], rows) and np.array_equal(got_a[1][0], rows * 3)
    assert np.array_equal(got_b[0][0], rows * 2) and got_b[0][1].tolist() == [5] and got_b[1] == []
    b.weights[:] = np.arange(b.weights.size) % 251
    into = a.weights[1000:1100]
    a.read(1, 10, 100, into)
    assert np.array_equal(into, np.arange(10, 110) % 251)
    a.write(1, 500, a.weights[1000:1100])
    assert np.array_equal(b.weights[500:600], np.arange(10, 110) % 251)


def test_recv_never_blocks_past_the_deadline(pair):
    a, _ = pair
    for wait in (0.05, 0.3):
        start = time.monotonic()
        result = a.recv([1], seq=99, deadline=start + wait)
        elapsed = time.monotonic() - start
        assert wait <= elapsed < wait + 0.1
        assert result.failed == {1: "no signal for seq 99 before the deadline"} and result.silent == {1}
        assert result.direct == set()
        with pytest.raises(PeerFailure, match=r"\[1\].*no signal for seq 99") as info:
            result.raise_for_failures()
        assert info.value.ranks == (1,)


def test_liveness_probe_names_a_dead_silent_source_before_the_deadline(pair):
    a, b = pair
    b.close()  # its engine is gone: nothing listens at its address any more
    start = time.monotonic()
    result = a.recv([1], seq=4, deadline=start + 3.0)
    assert time.monotonic() - start < 0.5
    assert result.direct == {1} and "probe write" in result.failed[1]
    assert a.peer_state(1)[0] == "failed"


def test_drop_fails_sends_at_once_and_blames_self(pair):
    a, _ = pair
    a.set_fault(drop=True)
    start = time.monotonic()
    result = a.exchange({0: [], 1: [np.ones(3, np.int32)]}, seq=3, timeout=2.0)
    assert time.monotonic() - start < 0.1
    assert list(result.failed) == [0] and "drop=True on rank 0" in result.failed[0]
    a.set_fault(drop=False)


# ------------------------------------------------------------------------------ rank processes


def _expected_digests(ranks, dest, seq, rows, row_bytes):
    return {src: payload_digest(make_payload(src, dest, seq, rows, row_bytes)) for src in ranks}


def _assert_exchange_ok(results, ranks, seq, rows, row_bytes):
    for rank in ranks:
        out = results[rank]
        assert out["failed"] == {} and out["bad"] == {}, (rank, out)
        assert out["received"] == sorted(ranks)
        assert out["digests"] == _expected_digests(ranks, rank, seq, rows, row_bytes)


@pytest.fixture
def cluster4():
    with LoopbackCluster(4, lifetime_s=60) as cluster:
        assert cluster.install_peers() == {r: None for r in range(4)}
        yield cluster
    for pid in cluster.pids:  # every process started was reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_all_to_all_bytes_and_seqs_intact(cluster4):
    ranks = list(range(4))
    for seq, rows in [(1, 64), (2, 0), (3, 1), (4, 64), (5, 17), (6, 64)]:
        results = cluster4.exchange(ranks, seq, rows)
        _assert_exchange_ok(results, ranks, seq, rows, cluster4.row_bytes)
    # a subset exchange: rank 3 sends and receives nothing this step
    results = cluster4.exchange([0, 1, 2], 7, 8)
    _assert_exchange_ok(results, [0, 1, 2], 7, 8, cluster4.row_bytes)


def _run_all(cluster, ranks, first_seq, rows=16):
    for rank in ranks:
        cluster.submit(rank, "run", first_seq=first_seq, steps=100_000, rows=rows, dests=list(ranks),
                       timeout=TIMEOUT)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_dead_or_hung_peer_is_named_within_the_deadline(cluster4, how):
    """Ranks exchange back to back; rank 3 is SIGKILLed or SIGSTOPped mid-run. Every survivor's
    exchange returns naming rank 3 within exchange_timeout + margin: nothing hangs. A killed rank is
    named by a failed write or liveness probe, before the deadline."""
    _run_all(cluster4, range(4), first_seq=1)
    time.sleep(1.0)
    hit = cluster4.signal(3, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    for rank in range(3):
        out = cluster4.collect(rank, wait=TIMEOUT + 5)
        assert out["steps"] > 10, out  # it was running before the failure
        assert 3 in out["failed"], out
        detected = out["t_detect"] - hit
        assert detected < TIMEOUT + MARGIN, (rank, detected, out["failed"])
        if how == "kill":
            assert detected < TIMEOUT and 3 not in out["silent"], (rank, detected, out["failed"])
    # the survivors carry on among themselves while rank 3 is dead or still stopped
    assert cluster4.install_peers([0, 1, 2]) == {0: None, 1: None, 2: None}
    results = cluster4.exchange([0, 1, 2], 10**6, 32)
    _assert_exchange_ok(results, [0, 1, 2], 10**6, 32, cluster4.row_bytes)


def test_hung_peer_in_flight_write_is_abandoned_then_reclaimed():
    """This process owns rank 0; ranks 1 and 2 are children. A write to a stopped rank is abandoned at
    the deadline (an orphan), later writes to others work, and once the hung rank is killed Mooncake
    fails the orphan so its batch is freed. Then the rank restarts with a new address and rejoins."""
    with LoopbackCluster(3, ranks=[1, 2], lifetime_s=60) as cluster, \
            Transport(0, 3, **cluster.transport_kwargs) as local:
        cluster.addresses[0] = local.address
        table = cluster.table()
        local.set_peers(table)
        assert cluster.call_all([1, 2], "set_peers", table=table, timeout=5) == {1: None, 2: None}

        def exchange(ranks, seq, rows=8):
            for rank in ranks[1:]:
                cluster.submit(rank, "exchange", seq=seq, rows=rows, dests=ranks, timeout=2.0, digests=True)
            mine = local.exchange({d: make_payload(0, d, seq, rows, cluster.row_bytes) for d in ranks}, seq,
                                  timeout=2.0)
            return mine, {r: cluster.collect(r, 10) for r in ranks[1:]}

        mine, theirs = exchange([0, 1, 2], 1)
        assert mine.ok and all(not t["failed"] for t in theirs.values())
        assert payload_digest(mine.payloads[2]) == payload_digest(make_payload(2, 0, 1, 8, cluster.row_bytes))

        cluster.signal(2, signal.SIGSTOP)
        start = time.monotonic()
        handle = local.send(2, make_payload(0, 2, 2, 8, cluster.row_bytes), seq=2)
        result = local.wait_sends([handle], deadline=start + 0.3)
        assert 0.3 <= time.monotonic() - start < 0.3 + MARGIN
        assert result.direct == {2} and "not completed before the deadline" in result.failed[2]
        assert local.orphan_count == 1 and local.peer_state(2)[0] == "failed"
        refused = local.send(2, [], seq=3)  # fails at once: the peer is marked failed, nothing submitted
        assert refused.state == "failed" and "not completed before the deadline" in refused.reason
        assert local.orphan_count == 1

        mine, theirs = exchange([0, 1], 4)  # a later batch to a live peer works meanwhile
        assert mine.ok and not theirs[1]["failed"]

        cluster.kill(2)
        deadline = time.monotonic() + 3
        while local.reclaim() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert local.orphan_count == 0

        old = cluster.addresses[2]
        cluster.restart(2)
        assert cluster.addresses[2].token != old.token
        table = cluster.table()
        local.set_peers(table)
        assert cluster.call_all([1, 2], "set_peers", table=table, timeout=5) == {1: None, 2: None}
        mine, theirs = exchange([0, 1, 2], 5)
        assert mine.ok and all(not t["failed"] and not t["bad"] for t in theirs.values())
        assert theirs[2]["digests"][0] == payload_digest(make_payload(0, 2, 5, 8, cluster.row_bytes))


def test_a_probe_left_in_flight_blocks_no_later_send():
    """Rank 0 waits for rank 1 while rank 1 is stopped: its liveness probe is still in flight at the
    deadline and stays an orphan, and rank 1 stays open (silence is weak evidence). A probe writes
    only its own word, so data to rank 1 is still sent (at 32 ranks on 2 cores, a probe that outlived
    one exchange used to fail every later send to a live peer). Once rank 1 runs again, the next
    exchange is exact and the probe's batch is freed."""
    with LoopbackCluster(2, ranks=[1], lifetime_s=60) as cluster, \
            Transport(0, 2, **cluster.transport_kwargs) as local:
        cluster.addresses[0] = local.address
        local.set_peers(cluster.table())
        assert cluster.call(1, "set_peers", table=cluster.table(), timeout=5) is None
        cluster.signal(1, signal.SIGSTOP)
        start = time.monotonic()
        silent = local.recv([1], seq=1, deadline=start + 0.3)
        assert silent.silent == {1} and silent.direct == set(), silent.failed
        assert local.orphan_count == 1 and local.peer_state(1)[0] == "open"    # the probe, pending
        handle = local.send(1, make_payload(0, 1, 2, 8, cluster.row_bytes), seq=2)
        assert handle.state != "failed", handle.reason
        os.kill(cluster.procs[1].pid, signal.SIGCONT)
        cluster.submit(1, "exchange", seq=2, rows=8, dests=[0, 1], timeout=5.0, digests=True)
        mine = local.recv([1], seq=2, deadline=time.monotonic() + 5.0, copy=True)
        sent = local.wait_sends([handle], deadline=time.monotonic() + 5.0)
        theirs = cluster.collect(1, 10)
        assert mine.ok and sent.ok and not theirs["failed"], (mine.failed, sent.failed, theirs)
        assert payload_digest(mine.payloads[1]) == payload_digest(make_payload(1, 0, 2, 8, cluster.row_bytes))
        assert theirs["digests"][0] == payload_digest(make_payload(0, 1, 2, 8, cluster.row_bytes))
        deadline = time.monotonic() + 3
        while local.reclaim() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert local.orphan_count == 0


def test_drop_and_delay_injection():
    with LoopbackCluster(3, lifetime_s=60) as cluster:
        assert cluster.install_peers() == {0: None, 1: None, 2: None}
        ranks = [0, 1, 2]
        cluster.call(2, "fault", drop=True)
        results = cluster.exchange(ranks, 1, 8)
        assert results[2]["elapsed"] < 0.1 and list(results[2]["failed"]) == [2]
        for rank in (0, 1):
            assert results[rank]["failed"] == {2: "no signal for seq 1 before the deadline"}
            assert results[rank]["silent"] == [2]
            assert TIMEOUT <= results[rank]["elapsed"] < TIMEOUT + MARGIN
        cluster.call(2, "fault", drop=False)
        _assert_exchange_ok(cluster.exchange(ranks, 2, 8), ranks, 2, 8, cluster.row_bytes)

        cluster.call(1, "fault", delay_s=0.3)  # slow but within a 2 s deadline: no failure
        results = cluster.exchange(ranks, 3, 8, timeout=2.0)
        _assert_exchange_ok(results, ranks, 3, 8, cluster.row_bytes)
        assert all(results[r]["elapsed"] >= 0.25 for r in (0, 2))
        cluster.call(1, "fault", delay_s=1.0)  # slower than the 0.5 s deadline: named, not waited for
        results = cluster.exchange(ranks, 4, 8)
        for rank in (0, 2):
            assert list(results[rank]["failed"]) == [1]
            assert TIMEOUT <= results[rank]["elapsed"] < TIMEOUT + MARGIN
        assert results[1]["failed"] == {}  # the slow rank itself got everything, late
        cluster.call(1, "fault", delay_s=0.0)
        _assert_exchange_ok(cluster.exchange(ranks, 5, 8), ranks, 5, 8, cluster.row_bytes)


def test_set_peers_names_dead_and_hung_peers_without_blocking():
    with LoopbackCluster(4, lifetime_s=60) as cluster:
        cluster.kill(3)
        cluster.signal(2, signal.SIGSTOP)  # hung before anyone connected: the handshake would block
        start = time.monotonic()
        results = cluster.call_all([0, 1], "set_peers", table=cluster.table(), timeout=1.0)
        for rank in (0, 1):
            failure = results[rank]
            assert isinstance(failure, PeerFailure) and set(failure.ranks) >= {2}, failure
        assert time.monotonic() - start < 1.0 + MARGIN + 0.5
        # While a handshake with rank 2 is stuck inside Mooncake, sends fail at once naming rank 2.
        stuck = cluster.exchange([0, 1], 1, 8)
        assert all(2 in stuck[r]["failed"] or 3 in stuck[r]["failed"] for r in (0, 1)), stuck
        assert all(stuck[r]["elapsed"] < TIMEOUT + MARGIN for r in (0, 1))
        cluster.kill(2)  # the stuck handshake now fails fast; 0 and 1 carry on alone
        time.sleep(0.3)
        assert cluster.install_peers([0, 1]) == {0: None, 1: None}
        _assert_exchange_ok(cluster.exchange([0, 1], 2, 8), [0, 1], 2, 8, cluster.row_bytes)


def test_read_expert_weights_from_a_replica():
    size = 1 << 20
    with LoopbackCluster(3, lifetime_s=60, weights_bytes=size) as cluster:
        assert cluster.install_peers() == {0: None, 1: None, 2: None}
        crc = cluster.call(1, "fill_weights", seed=7)
        expected = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
        assert crc == zlib.crc32(expected.data)
        got = cluster.call(0, "read", peer=1, offset=4096, nbytes=300_000, timeout=2.0)
        assert got == zlib.crc32(expected[4096:4096 + 300_000].data)
        cluster.signal(1, signal.SIGSTOP)
        start = time.monotonic()
        failure = cluster.call(0, "read", peer=1, offset=0, nbytes=4096, timeout=0.3)
        assert isinstance(failure, PeerFailure) and failure.ranks == (1,)
        assert time.monotonic() - start < 0.3 + MARGIN
        cluster.kill(2)
        failure = cluster.call(0, "read", peer=2, offset=0, nbytes=4096, timeout=2.0)
        assert isinstance(failure, PeerFailure) and failure.ranks == (2,) and "failed" in failure.reason
