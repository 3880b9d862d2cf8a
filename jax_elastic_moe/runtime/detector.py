"""Heartbeat failure detection: a pure timeout-with-margin detector plus pyzmq heartbeat threads.

Workers run a `HeartbeatSender` (a thread with a PUSH socket) that sends a "heartbeat" control message
every `interval` seconds; the controller runs a `HeartbeatMonitor` (a thread with a PULL socket) that
feeds a `HeartbeatDetector` and calls back when a rank falls silent or comes back.

Rule: a watched peer is suspected once nothing has arrived from it for more than `timeout` seconds
(the first heartbeat after `watch` gets `startup_grace`). Defaults interval=0.2 s, timeout=3 s: a
peer must miss ~15 heartbeats in a row. Why a fixed timeout with a wide margin and not an adaptive
(phi-accrual) one: on a 2-core machine where every worker compiles XLA programs, heartbeat gaps of
a few hundred ms are normal and bursty, an adaptive estimate tightens during quiet periods and then
fires on the first burst, while a fixed bound gives a detection time anyone can state (at most
timeout + one monitor tick) and no false alarm unless a sender is starved for 3 s. Killed and hung
ranks in mid-step are caught sooner by the exchange deadline (transport.py); heartbeats cover idle
ranks and the controller's view of membership.

A heartbeat carries the sender's incarnation (a random token per process start); a monitor watching
a rank with a given incarnation ignores the heartbeats of any other, so a stale process resumed after
SIGSTOP cannot pass for the restarted rank.
"""
from __future__ import annotations

import abc
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import zmq

from .control import ProtocolError, decode, encode, make_socket, message, bind_endpoint

__all__ = [
    "BeaconWatch", "ControllerBeacon", "DEFAULT_HEARTBEAT_INTERVAL", "DEFAULT_HEARTBEAT_TIMEOUT", "HeartbeatDetector",
    "HeartbeatEvent",
    "HeartbeatMonitor", "HeartbeatSender", "PeerHealth", "new_incarnation",
]

DEFAULT_HEARTBEAT_INTERVAL = 0.2
DEFAULT_HEARTBEAT_TIMEOUT = 3.0
_MIN_MARGIN = 3  # timeout must span at least this many intervals

log = logging.getLogger(__name__)


def new_incarnation() -> int:
    """A random token identifying one start of a worker process."""
    return secrets.randbits(62)


@dataclass
class PeerHealth:
    """What the detector knows about one watched peer (times from the detector's clock)."""

    peer: Hashable
    incarnation: int | None
    watched_at: float
    last_seen: float | None = None
    beats: int = 0
    max_gap: float = 0.0  # longest silence between consecutive heartbeats
    suspected: bool = False

    def silent_for(self, now: float) -> float:
        return now - (self.watched_at if self.last_seen is None else self.last_seen)


@dataclass(frozen=True)
class HeartbeatEvent:
    kind: str  # "suspect" or "recover"
    peer: Hashable
    silent_for: float  # seconds without a heartbeat when the event was raised


def _check_timing(interval: float, timeout: float):
    if not interval > 0:
        raise ValueError(f"heartbeat_interval must be > 0 seconds, got {interval!r}")
    if not timeout >= _MIN_MARGIN * interval * (1 - 1e-9):
        raise ValueError(f"heartbeat_timeout ({timeout!r} s) must be at least {_MIN_MARGIN} x "
                         f"heartbeat_interval ({interval!r} s) so that one late heartbeat is no alarm")


class HeartbeatDetector:
    """Timeout-with-margin failure detector; pure logic, the clock is injectable.

    Args:
      interval: seconds between a sender's heartbeats (used to validate the margin).
      timeout: silence after which a peer is suspected (>= 3 x interval).
      startup_grace: silence allowed before a newly watched peer's first heartbeat (default timeout).
      clock: returns seconds; time.monotonic by default.
    """

    def __init__(self, interval: float = DEFAULT_HEARTBEAT_INTERVAL, timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
                 *, startup_grace: float | None = None, clock: Callable[[], float] = time.monotonic):
        _check_timing(interval, timeout)
        if startup_grace is not None and not startup_grace >= timeout:
            raise ValueError(f"startup_grace ({startup_grace!r} s) must be >= heartbeat_timeout ({timeout!r} s)")
        self.interval, self.timeout = float(interval), float(timeout)
        self.startup_grace = self.timeout if startup_grace is None else float(startup_grace)
        self.clock = clock
        self._peers: dict[Hashable, PeerHealth] = {}
        self._events: list[HeartbeatEvent] = []

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def watch(self, peer: Hashable, incarnation: int | None = None, now: float | None = None):
        """Start expecting heartbeats from `peer` (only from `incarnation`, if given); resets its state."""
        self._peers[peer] = PeerHealth(peer, incarnation, self._now(now))

    def unwatch(self, peer: Hashable):
        self._peers.pop(peer, None)

    @property
    def watched(self) -> list:
        return list(self._peers)

    def heartbeat(self, peer: Hashable, incarnation: int | None = None, now: float | None = None) -> bool:
        """Record a heartbeat; False (ignored) if `peer` is not watched or is another incarnation."""
        health = self._peers.get(peer)
        if health is None or (health.incarnation is not None and incarnation != health.incarnation):
            return False
        now = self._now(now)
        if health.last_seen is not None:
            health.max_gap = max(health.max_gap, now - health.last_seen)
        if health.suspected:
            health.suspected = False
            self._events.append(HeartbeatEvent("recover", peer, health.silent_for(now)))
        health.last_seen = now
        health.beats += 1
        return True

    def deadline(self, peer: Hashable) -> float:
        """When `peer` will be suspected if nothing arrives (detector clock)."""
        health = self._peers[peer]
        if health.last_seen is None:
            return health.watched_at + self.startup_grace
        return health.last_seen + self.timeout

    def poll(self, now: float | None = None) -> list[HeartbeatEvent]:
        """Suspect every watched peer past its deadline; return the events since the last poll."""
        now = self._now(now)
        for peer, health in self._peers.items():
            if not health.suspected and now > self.deadline(peer):
                health.suspected = True
                self._events.append(HeartbeatEvent("suspect", peer, health.silent_for(now)))
        events, self._events = self._events, []
        return events

    def suspects(self) -> set:
        return {peer for peer, health in self._peers.items() if health.suspected}

    def health(self, peer: Hashable) -> PeerHealth:
        return self._peers[peer]


def _bind(sock: zmq.Socket, endpoint: str, what: str) -> str:
    try:
        return bind_endpoint(sock, endpoint)
    except zmq.ZMQError as e:
        sock.close()
        raise RuntimeError(f"cannot bind {what} to {endpoint!r}: {e}") from e


class _SocketThread(abc.ABC):
    """A daemon thread that owns one zmq socket: start() opens it here and hands it to `_run` on the
    thread (a socket is used by one thread at a time); stop() ends the loop and joins."""

    _stop: threading.Event
    _thread: threading.Thread | None

    @abc.abstractmethod
    def _open_socket(self) -> zmq.Socket:
        """Create (and connect or bind) the socket, on the caller's thread."""

    @abc.abstractmethod
    def _run(self, sock: zmq.Socket):
        """The thread's loop; runs until `_stop` is set, then closes `sock`."""

    def start(self):
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        sock = self._open_socket()
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True, name=type(self).__name__)
        self._thread.start()
        return self

    def request_stop(self):
        """Ends the loop at its next tick without waiting for it (stop() then joins at once)."""
        self._stop.set()

    def stop(self, timeout: float = 2.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class HeartbeatSender(_SocketThread):
    """Worker side: a thread that sends a heartbeat to `endpoint` every `interval` seconds.

    If the monitor is unreachable, heartbeats are dropped (never queued up): a late burst of stale
    heartbeats would hide a real outage.
    """

    def __init__(self, endpoint: str, rank: int, *, incarnation: int | None = None,
                 interval: float = DEFAULT_HEARTBEAT_INTERVAL, context: zmq.Context | None = None):
        if not interval > 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {interval!r}")
        self.endpoint, self.rank, self.interval = endpoint, int(rank), float(interval)
        self.incarnation = new_incarnation() if incarnation is None else int(incarnation)
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.dropped = 0

    def _open_socket(self) -> zmq.Socket:
        sock = make_socket(self._context, zmq.PUSH, SNDHWM=4, IMMEDIATE=1)
        sock.connect(self.endpoint)
        return sock

    def _run(self, sock: zmq.Socket):
        try:
            next_beat = time.monotonic()
            while not self._stop.is_set():
                beat = encode(message("heartbeat", rank=self.rank, incarnation=self.incarnation, n=self.sent))
                try:
                    sock.send(beat, zmq.NOBLOCK)
                    self.sent += 1
                except zmq.Again:
                    self.dropped += 1
                # fixed schedule; after a stall (starved thread) resume from now, no catch-up burst
                next_beat = max(next_beat + self.interval, time.monotonic())
                self._stop.wait(next_beat - time.monotonic())
        finally:
            sock.close(linger=0)



class HeartbeatMonitor(_SocketThread):
    """Controller side: a thread that receives heartbeats and reports suspects through callbacks.

    Args:
      endpoint: zmq endpoint to bind ("tcp://127.0.0.1:0" picks a port; see `.endpoint` after start).
      interval, timeout, startup_grace: see HeartbeatDetector.
      on_suspect(peer, silent_for), on_recover(peer, silent_for): called on the monitor thread; an
        exception in a callback is logged and kept in `.callback_errors`, the monitor goes on.
      clock: for the detector (time.monotonic by default).
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0", *, interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 timeout: float = DEFAULT_HEARTBEAT_TIMEOUT, startup_grace: float | None = None,
                 on_suspect: Callable | None = None, on_recover: Callable | None = None,
                 context: zmq.Context | None = None, clock: Callable[[], float] = time.monotonic):
        self.detector = HeartbeatDetector(interval, timeout, startup_grace=startup_grace, clock=clock)
        self._requested_endpoint = endpoint
        self.endpoint: str | None = None
        self.on_suspect, self.on_recover = on_suspect, on_recover
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.callback_errors: list[BaseException] = []
        self.rejected = 0  # malformed heartbeats, or from unwatched ranks / other incarnations
        self._strangers: dict[tuple, int] = {}   # (rank, incarnation) -> well-formed heartbeats rejected

    def _open_socket(self) -> zmq.Socket:
        sock = make_socket(self._context, zmq.PULL)
        self.endpoint = _bind(sock, self._requested_endpoint, "the heartbeat monitor")
        return sock

    def watch(self, rank: int, incarnation: int | None = None):
        with self._lock:
            self.detector.watch(rank, incarnation)

    def unwatch(self, rank: int):
        with self._lock:
            self.detector.unwatch(rank)

    def suspects(self) -> set:
        with self._lock:
            return self.detector.suspects()

    def take_strangers(self) -> dict[tuple, int]:
        """{(rank, incarnation): count} of the well-formed heartbeats rejected since the last call (an
        unwatched rank, or another incarnation: e.g. a fenced worker whose host came back)."""
        with self._lock:
            out, self._strangers = self._strangers, {}
            return out

    def health(self, rank: int) -> PeerHealth:
        with self._lock:
            health = self.detector.health(rank)
            return PeerHealth(**vars(health))

    def _run(self, sock: zmq.Socket):
        tick_ms = max(1, int(1000 * min(self.detector.interval, self.detector.timeout / 10)))
        try:
            while not self._stop.is_set():
                sock.poll(tick_ms, zmq.POLLIN)
                # Drain everything queued before judging anyone: if this thread itself was starved,
                # the heartbeats that arrived meanwhile must count.
                beats = []
                while True:
                    try:
                        beats.append(sock.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                with self._lock:
                    for data in beats:
                        try:
                            msg = decode(data)
                            accepted = msg["type"] == "heartbeat" and self.detector.heartbeat(
                                msg["rank"], msg["incarnation"])
                            if not accepted and msg["type"] == "heartbeat":
                                key = (msg["rank"], msg["incarnation"])
                                self._strangers[key] = self._strangers.get(key, 0) + 1
                        except (ProtocolError, TypeError):
                            accepted = False
                        self.rejected += not accepted
                    events = self.detector.poll()
                for event in events:
                    self._notify(event)
        finally:
            sock.close(linger=0)

    def _notify(self, event: HeartbeatEvent):
        callback = self.on_suspect if event.kind == "suspect" else self.on_recover
        if callback is None:
            return
        try:
            callback(event.peer, event.silent_for)
        except Exception as e:  # a broken callback must not stop failure detection
            log.exception("heartbeat %s callback failed for %r", event.kind, event.peer)
            self.callback_errors.append(e)



class ControllerBeacon(_SocketThread):
    """Controller side: a PUB socket on which the controller says it is alive every `interval`
    seconds (a "heartbeat" of rank -1 with the controller's incarnation). Workers on other hosts
    watch it (BeaconWatch) and exit when it falls silent: a controller that crashed or was cut off
    must not leave its workers running."""

    def __init__(self, endpoint: str, *, interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 context: zmq.Context | None = None):
        self._requested_endpoint, self.interval = endpoint, float(interval)
        self.endpoint: str | None = None
        self.incarnation = new_incarnation()
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open_socket(self) -> zmq.Socket:
        sock = make_socket(self._context, zmq.PUB, SNDHWM=4)
        self.endpoint = _bind(sock, self._requested_endpoint, "the controller beacon")
        return sock

    def _run(self, sock: zmq.Socket):
        n = 0
        try:
            while not self._stop.is_set():
                try:
                    sock.send(encode(message("heartbeat", rank=-1, incarnation=self.incarnation, n=n)), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                n += 1
                self._stop.wait(self.interval)
        finally:
            sock.close(linger=0)


class BeaconWatch(_SocketThread):
    """Worker side: watches the controller's beacon with the same timeout rule as the controller's
    detector (HeartbeatDetector); calls on_lost(silent_for) once when it has been silent for
    `timeout` seconds (counted from start() until the first beat arrives)."""

    def __init__(self, endpoint: str, on_lost: Callable[[float], None], *, interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 timeout: float = DEFAULT_HEARTBEAT_TIMEOUT, context: zmq.Context | None = None):
        self.endpoint, self.on_lost = endpoint, on_lost
        self.detector = HeartbeatDetector(interval, timeout, startup_grace=timeout)
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open_socket(self) -> zmq.Socket:
        sock = make_socket(self._context, zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        self.detector.watch("controller")
        return sock

    def _run(self, sock: zmq.Socket):
        tick_ms = max(1, int(1000 * min(self.detector.interval, self.detector.timeout / 10)))
        try:
            while not self._stop.is_set():
                sock.poll(tick_ms, zmq.POLLIN)
                while True:
                    try:
                        msg = decode(sock.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    except ProtocolError:
                        continue
                    if msg["type"] == "heartbeat" and msg["rank"] == -1:
                        self.detector.heartbeat("controller")
                for event in self.detector.poll():
                    if event.kind == "suspect":
                        self.on_lost(event.silent_for)
                        return
        finally:
            sock.close(linger=0)
