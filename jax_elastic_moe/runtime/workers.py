"""The controller's side of the worker processes of the multi-process ("mooncake") runtime.

`Workers` starts the rank processes (or admits `jem worker`s started elsewhere), owns the control
channel to them (commands and their replies, keepalive pings), the heartbeat monitor and the
controller's beacon, and fences and shuts them down. `Liveness` judges a rank from direct evidence
only: what the OS says about a local process (exited, stopped: exact) and whether its heartbeats
arrive. A rank that is late but alive is slow, never dead. MooncakeRuntime (runtime/mooncake.py)
drives the steps and epochs on top of these."""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

from .controller import RankFailure
from .control import ControlServer, ControlTimeout, message
from .detector import ControllerBeacon, HeartbeatMonitor, new_incarnation
from .processes import proc_state

log = logging.getLogger(__name__)


def save_weights(path: str, params: dict):
    """params {path tuple: array} as one .npz of raw bytes (bfloat16 too), with each array's dtype
    name and shape; load_weights reads it back."""
    meta = {"/".join(map(str, p)): [np.asarray(a).dtype.name, list(np.shape(a))] for p, a in params.items()}
    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             **{k: np.ascontiguousarray(params[p]).reshape(-1).view(np.uint8)
                for k, p in zip(meta, params)})


def load_weights(path: str) -> dict:
    """The params of save_weights: {path tuple: array}."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    with np.load(path) as f:
        meta = json.loads(bytes(f["__meta__"]).decode())
        return {tuple(int(x) if x.isdigit() else x for x in k.split("/")):
                f[k].view(np.dtype(dtype)).reshape(shape) for k, (dtype, shape) in meta.items()}


class WorkerProcess:
    def __init__(self, rank: int, proc: subprocess.Popen | None):
        self.rank, self.proc = rank, proc
        self.pid: int | None = proc.pid if proc else None
        self.address: dict | None = None
        self.exchange: str | None = None        # "native" (the C++ op) or "python", from its init reply

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stopped(self) -> bool | None:
        """Whether the process is stopped (SIGSTOP): None when unknown (not a local child)."""
        if self.proc is None or self.pid is None:
            return None
        state = proc_state(f"/proc/{self.pid}/stat")
        return None if state is None else state in ("T", "t")

    def signal(self, sig):
        """Signals a local child only: a remote worker's pid (from its hello) names a process of
        another host, and here perhaps an unrelated one."""
        if self.proc is not None and self.pid is not None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self):
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


class Liveness:
    """Whether each rank is dead, on direct evidence: its process exited or is stopped (local
    workers: /proc, exact), or its heartbeats stopped (remote workers: silence past `dead_after`).
    `monitor` is anything with health(rank).silent_for(now) (a HeartbeatMonitor)."""
    HARD_LIMIT_S = 600.0        # a rank that heartbeats but has not answered a step for this long is wedged

    def __init__(self, procs: dict[int, WorkerProcess], monitor, heartbeat_interval: float, dead_after: float):
        self.procs, self.monitor = procs, monitor
        self.heartbeat_interval, self.dead_after = heartbeat_interval, dead_after

    def silent_s(self, rank: int) -> float:
        """Seconds since the last heartbeat of `rank` (its heartbeat thread runs even while its step
        computes, so a long silence means a stopped or dead process, not a slow one)."""
        try:
            return self.monitor.health(rank).silent_for(time.monotonic())
        except KeyError:
            return float("inf")

    def heartbeating(self, rank: int) -> bool:
        """Its heartbeats arrive: silent for less than max(1 s, 5 heartbeat intervals)."""
        return self.silent_s(rank) < max(1.0, 5 * self.heartbeat_interval)

    def dead_now(self, rank: int) -> bool:
        """Exited, or stopped: for a local worker the OS says so exactly (its heartbeat thread may be
        starved of the GIL by a compile on a busy host without the process being hung); for a remote
        one, heartbeat silence past `dead_after`."""
        w = self.procs[rank]
        if w.exited():
            return True
        stopped = w.stopped()
        if stopped is not None:
            return stopped
        try:
            return self.monitor.health(rank).silent_for(time.monotonic()) > self.dead_after
        except KeyError:                            # starting: nothing but its process can tell
            return False

    def evidence(self, rank: int) -> str:
        """What the OS and the heartbeats say about `rank`."""
        return ", ".join(filter(None, [
            "process exited" if self.procs[rank].exited() else "",
            "process stopped" if self.procs[rank].stopped() else "",
            f"no heartbeat for {self.silent_s(rank):.1f} s" if self.silent_s(rank) > self.dead_after else ""]))

    def confirm(self, rank: int, named_by: set, unanswered: bool, step_started: float) -> tuple[bool, str]:
        """Whether `rank` is dead, on its own evidence, and the evidence: its process exited or is
        stopped; its heartbeats stopped (remote); it named itself (its own transfers fail: a broken
        endpoint in a live process); remote only: a peer's transfer to it failed outright and its
        heartbeats are late too; or it heartbeats but has not answered the step started at
        `step_started` within HARD_LIMIT_S (wedged). A rank named by peers, or late, whose process
        runs and whose heartbeats arrive is slow, not dead."""
        w = self.procs[rank]
        facts = [f"process exited (status {w.proc.returncode})" if w.exited() else "",
                 "process stopped" if w.stopped() else "",
                 f"no heartbeat for {self.silent_s(rank):.1f} s" if not self.heartbeating(rank) else "",
                 f"transfers to it failed (reported by ranks {sorted(named_by - {rank})})" if named_by - {rank} else "",
                 "its own transfers fail" if rank in named_by else "",
                 "no answer to the step" if unanswered else ""]
        why = ", ".join(filter(None, facts))
        if self.dead_now(rank) or rank in named_by:
            return True, why
        if named_by and w.stopped() is None and not self.heartbeating(rank):
            return True, why
        if unanswered and time.monotonic() - step_started >= self.HARD_LIMIT_S:
            return True, why + f" for {self.HARD_LIMIT_S:.0f} s though its heartbeats arrive (wedged)"
        state = "process running" if w.proc is not None else "remote"
        return False, f"{why}; but {state} and heartbeats arriving: slow, not dead"


class Workers:
    """The rank processes and the controller's channels to them. `spawn`: start one local process
    per rank (they share a temporary folder, `tmp`, for the weights file and a compilation cache);
    else wait for `jem worker`s to say hello on `endpoint`."""
    KEEPALIVE_S = 10.0
    SPAWN_ATTEMPTS = 3

    def __init__(self, *, endpoint: str, spawn: bool, worker_host: str, heartbeat_interval: float,
                 heartbeat_timeout: float, start_timeout: float):
        self.spawn, self.worker_host, self.start_timeout = spawn, worker_host, start_timeout
        self.heartbeat_interval = heartbeat_interval
        self.procs: dict[int, WorkerProcess] = {}
        self.injected_at: dict[int, float] = {}     # fault injection time per rank (detection timing)
        self.incarnations: dict[int, int] = {}      # rank -> the incarnation of its current process
        self.fenced: set[tuple] = set()             # (rank, incarnation) of every process fenced
        self.told_to_exit = 0                       # fenced processes heard from again, and told to exit
        self.stale_heartbeats = 0                   # heartbeats of fenced processes, dropped
        self.tmp = tempfile.mkdtemp(prefix="jem-workers-") if spawn else None
        self._ids = itertools.count(1)
        self._pinged = time.monotonic()
        self.monitor = self.beacon = None
        self.server = ControlServer(endpoint)
        self.endpoint = self.server.endpoint
        # heartbeats and the beacon use the controller's own address (remote workers cannot reach
        # 127.0.0.1), each on a free port
        any_port = self.endpoint.rsplit(":", 1)[0] + ":0"
        self.monitor = HeartbeatMonitor(any_port, interval=heartbeat_interval, timeout=heartbeat_timeout)
        self.monitor.start()
        self.beacon = ControllerBeacon(any_port, interval=heartbeat_interval).start()
        # workers exit when the beacon is silent this long: the heartbeat timeout for workers on other
        # hosts; spawned ones also watch their parent process, so they allow a starved controller more
        self.controller_timeout = max(30.0, 10 * heartbeat_timeout) if spawn else heartbeat_timeout
        self.liveness = Liveness(self.procs, self.monitor, heartbeat_interval, heartbeat_timeout)

    def next_id(self) -> int:
        return next(self._ids)

    def send(self, rank: int, msg: dict):
        self.server.send(f"rank-{rank}".encode(), msg)

    # -- starting -----------------------------------------------------------------------------------
    def _spawn(self, rank: int) -> WorkerProcess:
        env = dict(os.environ, JAX_PLATFORMS="cpu", MC_LOG_LEVEL="ERROR",
                   PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
                       os.path.dirname(os.path.abspath(__file__)))), os.environ.get("PYTHONPATH")])))
        # one compute thread per worker: N workers share the host's cores
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        cmd = [sys.executable, "-m", "jax_elastic_moe.runtime.worker", "--controller", self.endpoint,
               "--rank", str(rank), "--host", self.worker_host, "--die-with-parent"]
        return WorkerProcess(rank, subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))

    def init_msg(self, rank: int, fields: dict) -> dict:
        """The init message of `rank`: the runtime's `fields` (model, placement) and the channels."""
        return message("init", id=self.next_id(), **fields, heartbeat_endpoint=self.monitor.endpoint,
                       heartbeat_interval=self.heartbeat_interval, controller_beacon=self.beacon.endpoint,
                       controller_timeout=self.controller_timeout, incarnation=new_incarnation(),
                       compilation_cache_dir=os.path.join(self.tmp, "xla") if self.tmp else None)

    def start(self, ranks: list[int], fields: Callable[[int], dict], spawn: bool | None = None):
        """Starts (`spawn`, default the fleet's) or waits for external `jem worker`s of `ranks`, and
        sends each its init; a spawned process that exits before its hello is started again,
        SPAWN_ATTEMPTS times in all."""
        spawn = self.spawn if spawn is None else spawn
        for r in ranks:
            self.procs[r] = self._spawn(r) if spawn else WorkerProcess(r, None)
        waiting, deadline = set(ranks), time.monotonic() + self.start_timeout
        tries = {r: 1 for r in ranks}
        while waiting:
            self.keepalive()
            for r in [r for r in sorted(waiting) if self.procs[r].exited()]:
                status = self.procs[r].proc.returncode
                if tries[r] >= self.SPAWN_ATTEMPTS:
                    raise RuntimeError(f"worker process of rank {r} exited with status {status} before it said "
                                       f"hello, {tries[r]} times")
                log.warning("worker process of rank %d exited with status %s before it said hello; starting it "
                            "again (attempt %d of %d)", r, status, tries[r] + 1, self.SPAWN_ATTEMPTS)
                tries[r] += 1
                self.procs[r] = self._spawn(r)
            try:
                inc = self.server.recv(min(0.2, max(0.0, deadline - time.monotonic())))
            except ControlTimeout:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"ranks {sorted(waiting)} did not say hello within {self.start_timeout} s "
                                       f"(the others did)") from None
                continue
            if inc.msg["type"] == "hello" and inc.msg["rank"] in waiting:
                r = int(inc.msg["rank"])
                self.procs[r].pid = int(inc.msg["pid"])
                waiting.discard(r)
        init = {r: self.init_msg(r, fields(r)) for r in ranks}
        replies = self.command(ranks, lambda r: init[r], timeout=self.start_timeout, what="init")
        for r in ranks:
            self.procs[r].address, self.procs[r].exchange = replies[r]["address"], replies[r].get("exchange")
            self.watch(r, init[r]["incarnation"])

    def keepalive(self):
        """Every KEEPALIVE_S, a ping to every worker not known dead: a worker waiting for the others
        (their init or compile) must not take the controller for gone (its idle timeout)."""
        now = time.monotonic()
        if now - self._pinged < self.KEEPALIVE_S:
            return
        self._pinged = now
        for r, w in self.procs.items():
            if not w.exited():
                self.send(r, message("ping"))

    # -- commands -----------------------------------------------------------------------------------
    def command(self, ranks, make, timeout: float, what: str) -> dict:
        """Sends make(rank) to each rank and waits for every reply; errors name the rank. A rank that
        dies meanwhile (process exited or stopped, heartbeats silent) is a RankFailure within the
        heartbeat timeout, never a wait to the end of `timeout`."""
        ids = {}
        for r in ranks:
            msg = make(r)
            ids[msg["id"]] = r
            self.send(r, msg)
        replies, deadline = {}, time.monotonic() + timeout
        while len(replies) < len(ranks):
            self.keepalive()
            dead = [r for r in ranks if r not in replies and r in self.procs and self.liveness.dead_now(r)]
            if dead:
                raise self.failure(dead, "; ".join(f"rank {r}: {self.liveness.evidence(r)} during {what}"
                                                   for r in dead))
            try:
                inc = self.server.recv(min(0.05, max(0.0, deadline - time.monotonic())))
            except ControlTimeout:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"timed out waiting for {what} replies from ranks "
                                       f"{sorted(set(ranks) - set(replies))}") from None
                continue
            m = inc.msg
            if m["type"] != "reply" or m["id"] not in ids:
                continue
            if not m["ok"]:
                raise RuntimeError(f"rank {m['rank']} failed to {what}: {m.get('reason')}")
            replies[ids[m["id"]]] = m
        return replies

    def failure(self, dead, reason: str) -> RankFailure:
        """A RankFailure of `dead`, timed from the injection of a fault into one of them if any."""
        failure = RankFailure(sorted(dead), reason)
        injected = [self.injected_at.pop(r) for r in dead if r in self.injected_at]
        failure.failed_at = min(injected) if injected else failure.detected_at
        return failure

    def restart(self, rank: int, fields: dict):
        """Starts a fresh local process for `rank` and sends it its init (as `start` does)."""
        self.start([rank], lambda r: fields, spawn=True)

    def watch(self, rank: int, incarnation: int):
        self.incarnations[rank] = incarnation
        self.monitor.watch(rank, incarnation)

    # -- ending -------------------------------------------------------------------------------------
    def fence(self, ranks):
        """Makes sure ranks declared dead are dead (a paused or dropping process must not come back)."""
        fenced = [self.procs[r] for r in ranks if r in self.procs]
        for w in fenced:                    # every signal first, then the waits: k failures cost one wait
            w.signal(signal.SIGKILL)
        for w in fenced:
            w.kill()
            self.monitor.unwatch(w.rank)
            if w.rank in self.incarnations:
                self.fenced.add((w.rank, self.incarnations.pop(w.rank)))

    def tell_fenced_to_exit(self):
        """A fenced process that is heard from again (its heartbeats: a host cut off, then back, whose
        workers did not exit on their own) is told to exit. The message names its incarnation, so a
        new process of the same rank ignores it."""
        for (rank, incarnation), beats in self.monitor.take_strangers().items():
            if (rank, incarnation) in self.fenced:
                self.stale_heartbeats += beats
                log.warning("rank %d (incarnation %d) was fenced but is heard from again: telling it to exit",
                            rank, incarnation)
                self.send(rank, message("shutdown", incarnation=incarnation))
                self.told_to_exit += 1

    def close(self):
        for w in self.procs.values():
            if not w.exited():
                self.send(w.rank, message("shutdown"))
        deadline = time.monotonic() + 10
        for w in self.procs.values():
            if w.proc is not None:
                try:
                    w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    w.kill()
        for part in (self.monitor, self.beacon):
            if part is not None:
                part.stop()
        self.server.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
