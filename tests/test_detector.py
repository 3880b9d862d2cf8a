"""Heartbeat failure detection: pure detector logic on a fake clock, then real heartbeating processes
(under CPU saturation, killed, stopped)."""
import os
import signal
import threading
import time

import pytest
from hypothesis import assume, given, settings, strategies as st

zmq = pytest.importorskip("zmq", reason="needs the elastic extras: pip install 'jax-elastic-moe[elastic]'")
pytest.importorskip("msgpack", reason="needs the elastic extras: pip install 'jax-elastic-moe[elastic]'")

from jax_elastic_moe.runtime.control import encode, make_socket, message  # noqa: E402
from jax_elastic_moe.runtime.detector import (DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT,  # noqa: E402
                                              HeartbeatDetector, HeartbeatMonitor, HeartbeatSender)
from runtime_support import bounded_test, burn_cpu, children, heartbeat_child  # noqa: E402,F401 (fixtures)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_defaults_are_generous():
    assert DEFAULT_HEARTBEAT_INTERVAL == 0.2 and DEFAULT_HEARTBEAT_TIMEOUT == 3.0


def test_timing_validation():
    with pytest.raises(ValueError, match="heartbeat_interval must be > 0"):
        HeartbeatDetector(interval=0)
    with pytest.raises(ValueError, match="at least 3 x heartbeat_interval"):
        HeartbeatDetector(interval=0.5, timeout=1.0)
    with pytest.raises(ValueError, match="startup_grace"):
        HeartbeatDetector(timeout=3.0, startup_grace=1.0)


def test_suspect_after_timeout_and_recover():
    clock = FakeClock()
    det = HeartbeatDetector(interval=0.2, timeout=3.0, clock=clock)
    det.watch(1)
    det.watch(2)
    for _ in range(10):
        clock.now += 0.2
        assert det.heartbeat(1) and det.heartbeat(2)
    assert det.poll() == []
    clock.now += 2.9  # rank 1 goes silent; rank 2 keeps beating
    det.heartbeat(2)
    assert det.poll() == [] and det.suspects() == set()
    clock.now += 0.2
    det.heartbeat(2)
    events = det.poll()
    assert [(e.kind, e.peer) for e in events] == [("suspect", 1)]
    assert events[0].silent_for == pytest.approx(3.1)
    assert det.poll() == [] and det.suspects() == {1}  # reported once
    clock.now += 1.0
    assert det.heartbeat(1)
    assert [(e.kind, e.peer) for e in det.poll()] == [("recover", 1)]
    assert det.suspects() == set()
    assert det.health(1).max_gap == pytest.approx(4.1)


def test_startup_grace_and_incarnations():
    clock = FakeClock()
    det = HeartbeatDetector(interval=0.2, timeout=3.0, startup_grace=10.0, clock=clock)
    det.watch(0, incarnation=111)
    clock.now += 9.0  # compiling: no heartbeat yet, still within the grace
    assert det.poll() == []
    assert not det.heartbeat(0, incarnation=222)  # a stale process of the same rank
    assert not det.heartbeat(5, incarnation=111)  # an unwatched rank
    clock.now += 1.5
    assert [(e.kind, e.peer) for e in det.poll()] == [("suspect", 0)]
    assert det.heartbeat(0, incarnation=111)
    assert [(e.kind, e.peer) for e in det.poll()] == [("recover", 0)]
    det.unwatch(0)
    clock.now += 100
    assert det.poll() == []  # an unwatched rank is never suspected
    assert det.suspects() == set() and det.watched == []


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=40),
       timeout=st.floats(min_value=0.6, max_value=4.0))
def test_suspected_exactly_when_a_gap_exceeds_timeout(gaps, timeout):
    assume(all(abs(gap - timeout) > 1e-6 for gap in gaps))  # no float ties at the boundary
    clock = FakeClock()
    det = HeartbeatDetector(interval=0.2, timeout=timeout, clock=clock)
    det.watch("r")
    det.heartbeat("r")
    suspected_ever = False
    for gap in gaps:
        clock.now += gap
        events = det.poll()
        should = gap > timeout
        assert bool(events) == should and det.suspects() == ({"r"} if should else set())
        suspected_ever |= should
        det.heartbeat("r")
        assert det.suspects() == set()
        assert [e.kind for e in det.poll()] == (["recover"] if should else [])
    assert (det.health("r").max_gap > timeout) == suspected_ever


def _collect_events(**kwargs):
    events, lock = [], threading.Lock()

    def record(kind):
        def callback(peer, silent_for):
            with lock:
                events.append((kind, peer, silent_for, time.monotonic()))
        return callback

    monitor = HeartbeatMonitor(on_suspect=record("suspect"), on_recover=record("recover"), **kwargs)
    return monitor, events


def _wait_for(predicate, timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def test_threads_in_process_detect_a_stopped_sender():
    monitor, events = _collect_events(interval=0.05, timeout=0.5)
    with monitor:
        monitor.watch(3, incarnation=42)
        sender = HeartbeatSender(monitor.endpoint, 3, incarnation=42, interval=0.05).start()
        assert _wait_for(lambda: monitor.health(3).beats >= 5, 5)
        assert events == []
        stopped_at = time.monotonic()
        sender.stop()
        assert _wait_for(lambda: events, 3)
        kind, peer, silent_for, at = events[0]
        # the last beat left at most one interval before stop(); the monitor ticks every interval
        assert (kind, peer) == ("suspect", 3) and 0.5 - 0.05 <= at - stopped_at < 0.5 + 0.3
        assert sender.sent >= 5


def test_heartbeats_of_an_old_incarnation_are_dropped_and_reported():
    """A fenced process (rank 3, incarnation 41) that is heard from again beside its successor (42):
    its beats do not count for rank 3, and take_strangers names it with how many arrived."""
    with HeartbeatMonitor(interval=0.05, timeout=0.5) as monitor:
        monitor.watch(3, incarnation=42)
        with HeartbeatSender(monitor.endpoint, 3, incarnation=42, interval=0.05), \
                HeartbeatSender(monitor.endpoint, 3, incarnation=41, interval=0.05) as old:
            assert _wait_for(lambda: old.sent >= 5 and monitor.rejected >= 3, 5)
        strangers = monitor.take_strangers()
        assert list(strangers) == [(3, 41)] and strangers[(3, 41)] == monitor.rejected
        assert monitor.health(3).beats >= 3 and monitor.take_strangers() == {}


def test_sender_drops_beats_while_no_monitor_listens():
    """Heartbeats are not queued for later: a burst of stale beats would hide an outage."""
    with HeartbeatSender("tcp://127.0.0.1:9", 0, interval=0.02) as sender:  # nothing listens there
        assert _wait_for(lambda: sender.dropped >= 5, 5)
    assert sender.sent == 0


def test_monitor_survives_bad_heartbeats_and_callback_errors():
    def broken(peer, silent_for):
        raise RuntimeError("callback bug")

    with HeartbeatMonitor(interval=0.05, timeout=0.3, on_suspect=broken) as monitor:
        monitor.watch(1)
        push = make_socket(zmq.Context.instance(), zmq.PUSH)
        push.connect(monitor.endpoint)
        try:
            push.send(b"\xc1 not msgpack")
            push.send(encode(message("ack")))
            push.send(encode(message("heartbeat", rank=[1], incarnation=None, n=0)))  # unhashable rank
            assert _wait_for(lambda: monitor.rejected == 3, 3)
            assert _wait_for(lambda: monitor.callback_errors, 3)  # rank 1 never beat: suspected
            push.send(encode(message("heartbeat", rank=1, incarnation=None, n=0)))
            assert _wait_for(lambda: monitor.suspects() == set(), 3)  # still running after the error
        finally:
            push.close(linger=0)


def _start_heartbeat_children(children, monitor, ranks, lifetime):
    procs = {}
    for rank in ranks:
        monitor.watch(rank, incarnation=1000 + rank)
        procs[rank] = children.start(heartbeat_child, monitor.endpoint, rank, 1000 + rank,
                                     DEFAULT_HEARTBEAT_INTERVAL, lifetime)
    # spawn + import: wait for every child's first heartbeat before judging anything
    assert _wait_for(lambda: all(monitor.health(r).beats > 0 for r in ranks), 30)
    return procs


def test_no_false_alarm_with_both_cores_saturated(children):
    """Default timings, 3 heartbeating processes and 2 x cores busy spinners for 8 s: no suspicion."""
    monitor, events = _collect_events(startup_grace=30.0)
    with monitor:
        ranks = [0, 1, 2]
        _start_heartbeat_children(children, monitor, ranks, lifetime=40)
        burn_seconds = 8.0
        load = [children.start(burn_cpu, burn_seconds) for _ in range(2 * (os.cpu_count() or 2))]
        beats_before = {r: monitor.health(r).beats for r in ranks}
        for proc in load:  # each spinner runs burn_seconds from its own start
            proc.join(burn_seconds + 20)
        assert all(p.exitcode == 0 for p in load)
        assert events == [], f"false suspicion under load: {events}"
        for r in ranks:
            health = monitor.health(r)
            # beats kept flowing under load (at least a third of the nominal rate)
            assert health.beats - beats_before[r] >= burn_seconds / DEFAULT_HEARTBEAT_INTERVAL / 3
            assert health.max_gap < DEFAULT_HEARTBEAT_TIMEOUT


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_killed_or_stopped_worker_is_suspected_within_timeout(children, how):
    monitor, events = _collect_events(startup_grace=30.0)
    with monitor:
        procs = _start_heartbeat_children(children, monitor, [0, 1], lifetime=40)
        time.sleep(0.5)
        hit = time.monotonic()
        os.kill(procs[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        assert _wait_for(lambda: events, DEFAULT_HEARTBEAT_TIMEOUT + 2)
        kind, peer, silent_for, at = events[0]
        assert (kind, peer) == ("suspect", 1)
        # the last beat came at most one interval before the signal; the monitor ticks every interval
        assert DEFAULT_HEARTBEAT_TIMEOUT - DEFAULT_HEARTBEAT_INTERVAL <= at - hit
        assert at - hit <= DEFAULT_HEARTBEAT_TIMEOUT + 2 * DEFAULT_HEARTBEAT_INTERVAL + 0.3
        assert monitor.suspects() == {1}
        if how == "stop":
            os.kill(procs[1].pid, signal.SIGCONT)
            assert _wait_for(lambda: len(events) == 2, 3)
            assert events[1][:2] == ("recover", 1)
        assert monitor.health(0).max_gap < 1.0
