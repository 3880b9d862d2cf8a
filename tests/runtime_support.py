"""Shared helpers of the runtime tests: a per-test time limit, bounded child processes, and the
session's counter of XLA compilations (jax_elastic_moe.testing.compile_counter).

Every child started here is bounded in time by itself (its own deadline) and is killed by pid when
the test ends (`ChildProcesses.close`), stopped or not.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time

import pytest

from jax_elastic_moe.testing.compile_counter import CompileCounter

DEFAULT_TEST_SECONDS = 60


class TimeLimitExceeded(Exception):
    """A test ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Raise TimeLimitExceeded in the main thread after `seconds` (SIGALRM; our code never blocks in C)."""
    def expire(signum, frame):
        raise TimeLimitExceeded(f"{what} ran past its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def bounded_test(request):
    """Autouse (import it into a test module): no test runs longer than DEFAULT_TEST_SECONDS."""
    with time_limit(DEFAULT_TEST_SECONDS, request.node.nodeid):
        yield


class ChildProcesses:
    """Spawned children that are killed by pid on close (SIGCONT first, so stopped ones die too)."""

    def __init__(self):
        self.ctx = mp.get_context("spawn")
        self.procs: list[mp.Process] = []

    def start(self, target, *args) -> mp.Process:
        proc = self.ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def close(self):
        for proc in self.procs:
            if proc.is_alive():
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)
            proc.join(5.0)
        assert not any(p.is_alive() for p in self.procs), "a child process survived SIGKILL"


@pytest.fixture
def children():
    procs = ChildProcesses()
    try:
        yield procs
    finally:
        procs.close()


# ----------------------------------------------------------------------------- child entry points


def heartbeat_child(endpoint: str, rank: int, incarnation: int, interval: float, lifetime: float):
    """Send heartbeats to `endpoint` until `lifetime` seconds pass."""
    from jax_elastic_moe.runtime.detector import HeartbeatSender

    with HeartbeatSender(endpoint, rank, incarnation=incarnation, interval=interval):
        time.sleep(lifetime)


def burn_cpu(seconds: float):
    """Spin one core for `seconds`."""
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


def control_worker(endpoint: str, rank: int, lifetime: float):
    """Register with the controller, then acknowledge every epoch broadcast until shutdown."""
    from jax_elastic_moe.runtime.control import ControlClient, ControlTimeout, message

    end = time.monotonic() + lifetime
    with ControlClient(endpoint, f"rank-{rank}") as client:
        reply = client.request(message("register", rank=rank, address={"pid": os.getpid()}), timeout=10)
        assert reply["type"] == "ack", reply
        while time.monotonic() < end:
            try:
                msg = client.recv(timeout=min(0.5, max(0.01, end - time.monotonic())))
            except ControlTimeout:
                continue
            if msg["type"] == "shutdown":
                return
            if msg["type"] == "epoch":
                client.notify(message("ack", rank=rank, epoch=msg["epoch"]))


COUNTER = CompileCounter()


def ffi_required(platform: str = "cpu") -> bool:
    """Whether JEM_REQUIRE_FFI names `platform` ("1" means cpu): then missing native kernels fail the
    tests that need them instead of skipping them (CI sets it: a broken kernel build is not green)."""
    value = os.environ.get("JEM_REQUIRE_FFI", "")
    wanted = {"cpu"} if value.strip() == "1" else {p.strip().lower() for p in value.split(",") if p.strip()}
    return platform.lower() in wanted
