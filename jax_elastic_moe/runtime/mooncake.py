"""The controller side of the multi-process ("mooncake") runtime: one worker process per rank.

The engine's process is the controller: it starts (or admits) the workers, sends every step's rows
to the live ranks, collects their tokens, and turns failures — a failed or timed-out exchange that
workers report, a worker that does not answer, a process that exited, missed heartbeats — into a
RankFailure naming the dead ranks. Applying a new epoch is a data update on the survivors: peers
table, active mask, placement, and the expert slots to load (from a surviving replica by Mooncake
read, else from the host backup this process keeps). Every worker keeps its KV-cache slots across
epochs, and its programs: a step's per-rank shape does not depend on how many ranks are live."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import numpy as np

from ..model.loader import EXPERT_PARAMS
from ..placement import Placement
from ..placement.movement import plan_moves
from .base import Applied
from .controller import EngineDead, RankFailure
from .control import ControlServer, ControlTimeout, message
from .detector import HeartbeatMonitor, new_incarnation
from .processes import proc_state
from .protocol import register_messages


class WorkerProcess:
    def __init__(self, rank: int, proc: subprocess.Popen | None):
        self.rank, self.proc = rank, proc
        self.pid: int | None = proc.pid if proc else None
        self.address: dict | None = None

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stopped(self) -> bool | None:
        """Whether the process is stopped (SIGSTOP): None when unknown (not a local child)."""
        if self.proc is None or self.pid is None:
            return None
        state = proc_state(f"/proc/{self.pid}/stat")
        return None if state is None else state in ("T", "t")

    def signal(self, sig):
        if self.pid is not None:
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


class MooncakeRuntime:
    """The Runtime of worker processes for `num_ranks` ranks; `placement` is global (dead ranks' slots
    empty)."""
    mode = "mooncake"

    def __init__(self, cfg, source: dict, dtype: str, num_ranks: int, placement: Placement,
                 backup: dict | None, *, exchange_timeout: float = 1.0, heartbeat_interval: float = 0.2,
                 heartbeat_timeout: float = 3.0, start_timeout: float = 300.0, max_rows: int = 4096,
                 endpoint: str = "tcp://127.0.0.1:0", spawn: bool = True, worker_host: str = "127.0.0.1",
                 backend: str = "auto"):
        register_messages()
        self.cfg, self.source, self.dtype = cfg, source, dtype
        self.num_ranks, self.spr = num_ranks, placement.slots_per_rank
        self.placement = placement
        self.backup = backup
        self.exchange_timeout, self.max_rows = exchange_timeout, max_rows
        self.heartbeat_interval = heartbeat_interval
        # heartbeat silence that means dead: the detector's timeout (a busy, compiling worker's heartbeat
        # thread can wait on the GIL for a second or more; a stopped process is silent for good)
        self.hb_dead_after = heartbeat_timeout
        self.start_timeout = start_timeout
        self.worker_host, self.backend = worker_host, backend
        self.moe_layer_ids = [i for i, m in enumerate(cfg.moe_layers) if m]
        self.live: list[int] = list(range(num_ranks))
        self.active = np.ones(num_ranks, np.int32)
        self.workers: dict[int, WorkerProcess] = {}
        self._ids = itertools.count(1)
        self._step_seq = 0
        self.shapes: list = []                      # the step shapes every live worker has compiled
        self.programs: dict[int, int] = {}          # rank -> programs it had compiled at its last step
        self.injected_at: dict[int, float] = {}     # fault injection time per rank (detection timing)
        self._closed = False
        self.server = ControlServer(endpoint)
        self.endpoint = self.server.endpoint
        self.monitor = HeartbeatMonitor(interval=heartbeat_interval, timeout=heartbeat_timeout)
        self.monitor.start()
        self.heartbeat_endpoint = self.monitor.endpoint
        try:
            self._start(list(range(num_ranks)), spawn)
        except Exception:
            self.close()
            raise

    # -- workers ------------------------------------------------------------------------------------
    def _spawn(self, rank: int) -> WorkerProcess:
        env = dict(os.environ, JAX_PLATFORMS="cpu", MC_LOG_LEVEL="ERROR",
                   PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
                       os.path.dirname(os.path.abspath(__file__)))), os.environ.get("PYTHONPATH")])))
        # one compute thread per worker: N workers share the host's cores
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        cmd = [sys.executable, "-m", "jax_elastic_moe.runtime.worker", "--controller", self.endpoint,
               "--rank", str(rank), "--host", self.worker_host, "--die-with-parent"]
        return WorkerProcess(rank, subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))

    def _start(self, ranks: list[int], spawn: bool):
        """Starts (or waits for external `jem worker`s of) `ranks`, sends init, installs peers."""
        for r in ranks:
            self.workers[r] = self._spawn(r) if spawn else WorkerProcess(r, None)
        waiting, deadline = set(ranks), time.monotonic() + self.start_timeout
        while waiting:
            gone = [r for r in sorted(waiting) if self.workers[r].exited()]
            if gone:
                raise RuntimeError(f"worker process of rank {gone[0]} exited with status "
                                   f"{self.workers[gone[0]].proc.returncode} before it said hello")
            try:
                inc = self.server.recv(min(0.2, max(0.0, deadline - time.monotonic())))
            except ControlTimeout:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"ranks {sorted(waiting)} did not start within {self.start_timeout} s")
                continue
            if inc.msg["type"] == "hello" and inc.msg["rank"] in waiting:
                r = int(inc.msg["rank"])
                self.workers[r].pid = int(inc.msg["pid"])
                waiting.discard(r)
        init = {r: self._init_msg(r) for r in ranks}
        replies = self._command(ranks, lambda r: init[r], timeout=self.start_timeout, what="init")
        for r in ranks:
            self.workers[r].address = replies[r]["address"]
            self.monitor.watch(r, init[r]["incarnation"])
        self.install(self.active, self.placement, loads={})

    def _init_msg(self, rank: int) -> dict:
        return message("init", id=next(self._ids), config=self.source["config"], dtype=self.dtype,
                       seed=int(self.source.get("seed", 0)), checkpoint=self.source.get("checkpoint"),
                       num_ranks=self.num_ranks, slots_per_rank=self.spr, max_rows=self.max_rows,
                       phy2log=self.placement.phy2log.tolist(), log2phy=self.placement.log2phy.tolist(),
                       active=self.active.tolist(), exchange_timeout=self.exchange_timeout,
                       heartbeat_endpoint=self.heartbeat_endpoint, heartbeat_interval=self.heartbeat_interval,
                       incarnation=new_incarnation(), backend=self.backend)

    def _recv(self, deadline: float, what: str):
        try:
            return self.server.recv(max(0.0, deadline - time.monotonic()))
        except ControlTimeout:
            raise TimeoutError(f"timed out waiting for {what}") from None

    def _command(self, ranks, make, timeout: float, what: str) -> dict:
        """Sends make(rank) to each rank and waits for every reply; errors name the rank. A rank that
        dies meanwhile (process exited or stopped, heartbeats silent) is a RankFailure within the
        heartbeat timeout, never a wait to the end of `timeout`."""
        ids = {}
        for r in ranks:
            msg = make(r)
            ids[msg["id"]] = r
            self.server.send(f"rank-{r}".encode(), msg)
        replies, deadline = {}, time.monotonic() + timeout
        while len(replies) < len(ranks):
            dead = [r for r in ranks if r not in replies and r in self.workers and self._dead_now(r)]
            if dead:
                failure = RankFailure(dead, "; ".join(f"rank {r}: {self._evidence(r)} during {what}" for r in dead))
                injected = [self.injected_at.pop(r) for r in dead if r in self.injected_at]
                failure.failed_at = min(injected) if injected else failure.detected_at
                raise failure
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

    # -- the runtime interface ------------------------------------------------------------------------
    @property
    def num_live(self) -> int:
        return len(self.live)

    def prepare(self, shapes: list, ranks: list[int] | None = None) -> float:
        """Every live worker (or `ranks`) compiles the programs of these per-rank step shapes before any
        step: a compile while serving would starve the exchange of its host thread (the GIL) and look
        like a failed peer. The shapes do not depend on the number of live ranks, so a recovery never
        compiles."""
        ranks = self.live if ranks is None else ranks
        t = time.perf_counter()
        self._command(ranks, lambda r: message("compile", id=next(self._ids), shapes=[s.as_list() for s in shapes]),
                      timeout=self.start_timeout, what="compile")
        self.shapes = list(shapes)
        return time.perf_counter() - t

    def prefill(self, batch):
        return self._step(batch)

    def decode(self, batch):
        return self._step(batch)

    def after_good_step(self, decide):
        pass

    def idle(self, busy):
        pass

    def _step(self, batch):
        """Sends each live rank its rows of the batch; returns (next tokens [rows], counts [Lm, E])."""
        self._step_seq += 1
        rows = batch.shape.rows
        ids = {}
        for i, r in enumerate(self.live):
            part = {k: v[i * rows:(i + 1) * rows].tolist() for k, v in batch.rows.items()}
            msg = message("step", id=next(self._ids), shape=batch.shape.as_list(), step=self._step_seq, **part)
            ids[msg["id"]] = r
            self.server.send(f"rank-{r}".encode(), msg)
        return self._collect(ids, rows)

    def _silent_s(self, rank: int) -> float:
        """Seconds since the last heartbeat of `rank` (its heartbeat thread runs even while its step
        computes, so a long silence means a stopped or dead process, not a slow one)."""
        try:
            return self.monitor.health(rank).silent_for(time.monotonic())
        except KeyError:
            return float("inf")

    def _dead_now(self, rank: int) -> bool:
        """Exited, or stopped: for a local worker the OS says so exactly (its heartbeat thread may be
        starved of the GIL by a compile on a busy host without the process being hung); for a remote
        one, heartbeat silence past the heartbeat timeout."""
        w = self.workers[rank]
        if w.exited():
            return True
        stopped = w.stopped()
        if stopped is not None:
            return stopped
        try:
            return self.monitor.health(rank).silent_for(time.monotonic()) > self.hb_dead_after
        except KeyError:                            # starting: nothing but its process can tell
            return False

    def _evidence(self, rank: int) -> str:
        """What the OS and the heartbeats say about `rank`."""
        return ", ".join(filter(None, [
            "process exited" if self.workers[rank].exited() else "",
            "process stopped" if self.workers[rank].stopped() else "",
            f"no heartbeat for {self._silent_s(rank):.1f} s" if self._silent_s(rank) > self.hb_dead_after else ""]))

    def _collect(self, ids: dict, b: int):
        """Waits until every rank has answered the step (tokens, or a report of a failed exchange) or
        is known dead: its process exited, its heartbeats stopped, or a peer's transfer to it failed.
        A rank that is only slow keeps heartbeating and is waited for, never declared dead: when a
        step fails with nobody dead (a timeout from compute skew) the RankFailure names no rank and
        the engine runs the step again. Every live rank has left the step when this returns."""
        replies, reports = {}, {}
        ranks = set(ids.values())
        limit = time.monotonic() + max(60.0, 4 * len(self.moe_layer_ids) * self.exchange_timeout + 30.0)
        while True:
            direct = set()
            for m in reports.values():
                direct |= {int(x) for x in m["direct"]}
            missing = ranks - set(replies) - set(reports)
            dead = {r for r in missing if self._dead_now(r)}
            if not missing - dead - direct or time.monotonic() >= limit:
                break
            try:
                inc = self.server.recv(0.01)
            except ControlTimeout:
                continue
            m = inc.msg
            if m["type"] != "reply" or m["id"] not in ids:
                continue
            r = ids[m["id"]]
            if m["ok"] and m.get("tokens") is not None:
                replies[r] = m
            elif m.get("failed_step"):
                reports[r] = m
            else:
                raise RuntimeError(f"rank {r} failed a step: {m.get('reason')}")
        if len(replies) == len(ids):
            return self._merge(replies, b)
        # still missing at the limit: heartbeating but never answering (a wedged step): dead too
        unanswered = ranks - set(replies) - set(reports)
        dead = sorted((dead | (direct & ranks) | unanswered) & ranks)
        evidence = {r: ", ".join(filter(None, [self._evidence(r), "a peer's transfer to it failed" if r in direct
                                                else "", "no answer" if r in unanswered else ""])) for r in dead}
        injected = [self.injected_at.pop(r) for r in dead if r in self.injected_at]
        failure = RankFailure(dead, "; ".join(f"rank {r}: {e}" for r, e in evidence.items())
                              or "a step timed out with every rank alive")
        failure.failed_at = min(injected) if injected else failure.detected_at
        raise failure

    def _merge(self, replies: dict, b: int):
        n = len(self.live)
        out = np.zeros(n * b, np.int32)
        counts = np.zeros((len(self.moe_layer_ids), self.cfg.num_experts), np.int64)
        for i, r in enumerate(self.live):
            out[i * b:(i + 1) * b] = replies[r]["tokens"]
            counts += np.asarray(replies[r]["counts"], np.int64).reshape(counts.shape)
            self.programs[r] = int(replies[r]["programs"])
        return out, counts

    # -- epochs ---------------------------------------------------------------------------------------
    def fence(self, ranks):
        """Makes sure ranks declared dead are dead (a paused or dropping process must not come back)."""
        for r in ranks:
            w = self.workers.get(r)
            if w is not None:
                w.kill()
                self.monitor.unwatch(r)

    def load_plan(self, old: Placement, new: Placement, fresh: set[int]) -> dict[int, list]:
        """Per live rank, the slots it must load for `new`: (moe layer, local slot, source)."""
        spr = self.spr
        intact = np.isin(np.arange(self.num_ranks), [r for r in self.live if r not in fresh])
        plan = {r: [] for r in self.live}
        for mv in plan_moves(old.phy2log, new.phy2log, spr, intact, np.isin(np.arange(self.num_ranks), self.live)):
            if mv.kind == "kept":
                continue
            if mv.kind == "backup":
                src = {"kind": "backup", "data": self._backup_bytes(mv.layer, mv.expert)}
            else:
                src = {"kind": mv.kind, "slot": mv.source % spr, "rank": mv.source // spr}
            plan[mv.slot // spr].append([mv.layer, mv.slot % spr, src])
        return plan

    def _backup_bytes(self, m: int, e: int) -> bytes:
        if self.backup is None:
            raise EngineDead(f"expert {e} of MoE layer {m} lost every replica and there is no host backup")
        layer = self.moe_layer_ids[m]
        return b"".join(np.ascontiguousarray(self.backup[("layers", layer, "mlp", p)][e]).tobytes()
                        for p in EXPERT_PARAMS)

    def install(self, active: np.ndarray, placement: Placement, loads: dict | None = None,
                fresh: set[int] = frozenset()) -> dict:
        """Installs an epoch on the live ranks: peers, mask, placement, then the two-phase weight move
        (every rank reads into staging, then every rank commits). Returns counts of loads by source."""
        old = self.placement
        self.active = np.asarray(active, np.int32)
        self.live = [r for r in range(self.num_ranks) if self.active[r]]
        peers = {str(r): self.workers[r].address for r in self.live}
        self._command(self.live, lambda r: message("install", id=next(self._ids), peers=peers,
                                                    active=self.active.tolist(), log2phy=placement.log2phy.tolist()),
                      timeout=60, what="install the epoch")
        plan = self.load_plan(old, placement, set(fresh)) if loads is None else loads
        stats = {"kept": 0, "peer": 0, "local": 0, "backup": 0}
        for items in plan.values():
            for _, _, src in items:
                stats[src["kind"]] += 1
        if any(plan.values()):
            self._command(self.live, lambda r: message("load", id=next(self._ids), loads=plan.get(r, [])),
                          timeout=120, what="load expert weights")
            self._command(self.live, lambda r: message("commit", id=next(self._ids)), timeout=60,
                          what="commit expert weights")
        self.placement = placement
        return stats

    def apply_epoch(self, active: np.ndarray, placement: Placement, dead: list[int], fresh=()) -> Applied:
        """Fences the dead, then installs the epoch on the live workers (data only, nothing compiles;
        a fresh worker compiles the step shapes before it takes part)."""
        self.fence(dead)
        if fresh and self.shapes:
            self.prepare(self.shapes, ranks=list(fresh))
        return Applied(self.install(active, placement, fresh=set(fresh)))

    def set_placement(self, active: np.ndarray, placement: Placement):
        self.install(active, placement, loads=None if placement is not self.placement else {})

    def restart(self, rank: int):
        """Starts a fresh worker for `rank` (init with the current placement; the engine then installs
        an epoch that gives it slots)."""
        if rank in self.live:
            raise ValueError(f"rank {rank} is alive")
        self.workers[rank] = self._spawn(rank)
        deadline = time.monotonic() + self.start_timeout
        while True:
            inc = self._recv(deadline, f"rank {rank} to start")
            if inc.msg["type"] == "hello" and inc.msg["rank"] == rank:
                self.workers[rank].pid = int(inc.msg["pid"])
                break
        init = self._init_msg(rank)
        reply = self._command([rank], lambda r: init, timeout=self.start_timeout, what="init")[rank]
        self.workers[rank].address = reply["address"]
        self.monitor.watch(rank, init["incarnation"])

    def inject(self, rank: int, how: str, delay_s: float = 1.0):
        """Fault injection: kill (SIGKILL), hang (SIGSTOP), slow (delays its exchanges), drop (its
        transfers fail)."""
        w = self.workers[rank]
        self.injected_at[rank] = time.perf_counter()
        if how == "kill":
            w.signal(signal.SIGKILL)
        elif how == "hang":
            w.signal(signal.SIGSTOP)
        else:
            self._command([rank], lambda r: message("fault", id=next(self._ids), how=how, delay_s=delay_s),
                          timeout=30, what=f"inject {how}")

    def close(self):
        if self._closed:
            return
        self._closed = True
        for w in self.workers.values():
            if not w.exited():
                self.server.send(f"rank-{w.rank}".encode(), message("shutdown"))
        deadline = time.monotonic() + 10
        for w in self.workers.values():
            if w.proc is not None:
                try:
                    w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    w.kill()
        self.monitor.stop()
        self.server.close()
