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
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..model.loader import EXPERT_PARAMS
from ..placement import Placement
from ..placement.movement import plan_moves
from .base import Applied
from .controller import EngineDead, RankFailure
from .control import ControlServer, ControlTimeout, message
from .detector import ControllerBeacon, HeartbeatMonitor, new_incarnation
from .loopback import proc_state
from .protocol import register_messages
from .step import input_rows, out_rows

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
                 backend: str = "auto", params: dict | None = None):
        register_messages()
        # the weights for spawned workers without a checkpoint, in one file they map: without it each of
        # N workers builds the whole random model itself (one XLA compile each: at 32 workers on 2
        # cores that alone took over 5 minutes)
        # spawned workers share a directory: the weights file, and a compilation cache in which one
        # worker compiles each step program and the others load it (the programs are the same for
        # every rank: 32 workers compiling on 2 cores did not finish in 5 minutes)
        self._tmp = tempfile.mkdtemp(prefix="jem-workers-") if spawn else None
        self._weights_file = None
        if params is not None and spawn and not source.get("checkpoint"):
            self._weights_file = os.path.join(self._tmp, "params.npz")
            save_weights(self._weights_file, params)
        self.cfg, self.source, self.dtype = cfg, source, dtype
        self.num_ranks, self.spr = num_ranks, placement.slots_per_rank
        self.placement = placement
        self.backup = backup
        # more local workers than cores: the ranks' steps are time-sliced, so the skew between a rank
        # that enters an exchange and the last peer to reach it grows with workers / cores; the
        # deadline grows with it (a killed peer is still found in milliseconds: failed writes, /proc)
        self.oversubscription = max(1.0, num_ranks / (os.cpu_count() or 1)) if spawn else 1.0
        self.exchange_timeout, self.max_rows = exchange_timeout * self.oversubscription, max_rows
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
        self._pinged = self._step_started = time.monotonic()
        self._closed = False
        self.server = ControlServer(endpoint)
        self.endpoint = self.server.endpoint
        # heartbeats arrive on the controller's own address (remote workers cannot reach 127.0.0.1)
        any_port = self.endpoint.rsplit(":", 1)[0] + ":0"     # the controller's host, a free port
        self.monitor = HeartbeatMonitor(any_port, interval=heartbeat_interval,
                                        timeout=heartbeat_timeout)
        self.monitor.start()
        self.heartbeat_endpoint = self.monitor.endpoint
        self.beacon = ControllerBeacon(any_port, interval=heartbeat_interval).start()
        # workers exit when the beacon is silent this long: the heartbeat timeout for workers on other
        # hosts; spawned ones also watch their parent process, so they allow a starved controller more
        self.controller_timeout = max(30.0, 10 * heartbeat_timeout) if spawn else heartbeat_timeout
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
        tries = {r: 1 for r in ranks}
        while waiting:
            self._keepalive()
            for r in [r for r in sorted(waiting) if self.workers[r].exited()]:
                status = self.workers[r].proc.returncode
                if tries[r] >= self.SPAWN_ATTEMPTS:
                    raise RuntimeError(f"worker process of rank {r} exited with status {status} before it said "
                                       f"hello, {tries[r]} times")
                log.warning("worker process of rank %d exited with status %s before it said hello; starting it "
                            "again (attempt %d of %d)", r, status, tries[r] + 1, self.SPAWN_ATTEMPTS)
                tries[r] += 1
                self.workers[r] = self._spawn(r)
            try:
                inc = self.server.recv(min(0.2, max(0.0, deadline - time.monotonic())))
            except ControlTimeout:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"ranks {sorted(waiting)} did not say hello within {self.start_timeout} s "
                                       f"(the others did)")
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
                       controller_beacon=self.beacon.endpoint, controller_timeout=self.controller_timeout,
                       incarnation=new_incarnation(), backend=self.backend,
                       weights_file=self._weights_file,
                       compilation_cache_dir=os.path.join(self._tmp, "xla") if self._tmp else None)

    KEEPALIVE_S = 10.0
    INSTALL_ATTEMPTS = 3
    SPAWN_ATTEMPTS = 3

    def _keepalive(self):
        """Every KEEPALIVE_S, a ping to every worker not known dead: a worker waiting for the others
        (their init or compile) must not take the controller for gone (its idle timeout)."""
        now = time.monotonic()
        if now - self._pinged < self.KEEPALIVE_S:
            return
        self._pinged = now
        for r, w in self.workers.items():
            if not w.exited():
                self.server.send(f"rank-{r}".encode(), message("ping"))

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
            self._keepalive()
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
        compile_msg = lambda r: message("compile", id=next(self._ids), shapes=[s.as_list() for s in shapes])  # noqa: E731
        if self._tmp is not None and len(ranks) > 1:    # one compiles into the shared cache, then the rest load
            self._command(ranks[:1], compile_msg, timeout=self.start_timeout, what="compile")
            ranks = ranks[1:]
        self._command(ranks, compile_msg, timeout=self.start_timeout, what="compile")
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
        self._step_started = time.monotonic()
        per_input = input_rows(batch.shape)
        ids = {}
        for i, r in enumerate(self.live):
            part = {k: batch.rows[k][i * n:(i + 1) * n].tolist() for k, n in per_input.items()}
            msg = message("step", id=next(self._ids), shape=batch.shape.as_list(), step=self._step_seq, **part)
            ids[msg["id"]] = r
            self.server.send(f"rank-{r}".encode(), msg)
        return self._collect(ids, out_rows(batch.shape))

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

    STEP_HARD_LIMIT_S = 600.0

    def _heartbeating(self, rank: int) -> bool:
        """Its heartbeats arrive: silent for less than max(1 s, 5 heartbeat intervals)."""
        return self._silent_s(rank) < max(1.0, 5 * self.heartbeat_interval)

    def _collect(self, ids: dict, b: int):
        """Waits until every rank has answered the step (tokens, or a report of a failed exchange) or
        is known dead (its process exited or stopped; remote: its heartbeats stopped). A rank that is
        only slow keeps heartbeating and is waited for, never declared dead, also past the step's
        usual limit (up to STEP_HARD_LIMIT_S: a rank that heartbeats but never answers is wedged).
        Suspicions are then confirmed one rank at a time, each on its own evidence (_confirm), so a
        cascade (peers that time out on one slow or dead rank name each other) fences only the ranks
        that are dead. A step that failed with nobody confirmed dead raises a RankFailure naming no
        rank: the engine runs the step again. Every live rank has left the step when this returns."""
        replies, reports = {}, {}
        ranks = set(ids.values())
        start = time.monotonic()
        limit = start + max(60.0, 4 * len(self.moe_layer_ids) * self.exchange_timeout + 30.0)
        hard = start + max(self.STEP_HARD_LIMIT_S, limit - start)
        while True:
            self._keepalive()
            missing = ranks - set(replies) - set(reports)
            dead = {r for r in missing if self._dead_now(r)}
            now = time.monotonic()
            if not missing - dead or now >= hard or (
                    now >= limit and not all(self._heartbeating(r) for r in missing - dead)):
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
        unanswered = ranks - set(replies) - set(reports) - dead
        named: dict[int, set] = {}                  # rank -> the ranks whose transfers to it failed outright
        for r, m in reports.items():
            for x in m["direct"]:
                named.setdefault(int(x), set()).add(r)
        confirmed, doubted = {}, {}
        for r in sorted((set(named) | dead | unanswered) & ranks):
            ok, why = self._confirm(r, named.get(r, set()), r in unanswered)
            (confirmed if ok else doubted)[r] = why
        if doubted:
            log.warning("step %d: suspected but alive (not fenced): %s", self._step_seq,
                        "; ".join(f"rank {r}: {e}" for r, e in doubted.items()))
        injected = [self.injected_at.pop(r) for r in confirmed if r in self.injected_at]
        said = "; ".join(f"rank {r} reported: {m.get('reason', '')[:160]}" for r, m in sorted(reports.items())[:2])
        reason = "; ".join(f"rank {r}: {e}" for r, e in confirmed.items()) or (
            f"step {self._step_seq} failed with every rank alive ({len(reports)} of {len(ranks)} ranks reported a "
            f"failed exchange{': ' + said if said else ''})"
            + ("; " + "; ".join(f"rank {r}: {e}" for r, e in doubted.items()) if doubted else ""))
        failure = RankFailure(sorted(confirmed), reason)
        failure.failed_at = min(injected) if injected else failure.detected_at
        raise failure

    def _confirm(self, rank: int, named_by: set, unanswered: bool) -> tuple[bool, str]:
        """Whether `rank` is dead, on its own evidence, and the evidence: its process exited or is
        stopped (local workers: /proc, exact); its heartbeats stopped (remote); it named itself (its
        own transfers fail: a broken endpoint in a live process); remote only: a peer's transfer to
        it failed outright and its heartbeats are late too; or it heartbeats but has not answered
        the step within STEP_HARD_LIMIT_S (wedged). A rank named by peers, or late, whose process
        runs and whose heartbeats arrive is slow, not dead."""
        w = self.workers[rank]
        facts = [f"process exited (status {w.proc.returncode})" if w.exited() else "",
                 "process stopped" if w.stopped() else "",
                 f"no heartbeat for {self._silent_s(rank):.1f} s" if not self._heartbeating(rank) else "",
                 f"transfers to it failed (reported by ranks {sorted(named_by - {rank})})" if named_by - {rank} else "",
                 "its own transfers fail" if rank in named_by else "",
                 "no answer to the step" if unanswered else ""]
        why = ", ".join(filter(None, facts))
        if self._dead_now(rank) or rank in named_by:
            return True, why
        if named_by and w.stopped() is None and not self._heartbeating(rank):
            return True, why
        if unanswered and time.monotonic() - self._step_started >= self.STEP_HARD_LIMIT_S:
            return True, why + f" for {self.STEP_HARD_LIMIT_S:.0f} s though its heartbeats arrive (wedged)"
        state = "process running" if w.proc is not None else "remote"
        return False, f"{why}; but {state} and heartbeats arriving: slow, not dead"

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
        fenced = [self.workers[r] for r in ranks if r in self.workers]
        for w in fenced:                    # every signal first, then the waits: k failures cost one wait
            w.signal(signal.SIGKILL)
        for w in fenced:
            w.kill()
            self.monitor.unwatch(w.rank)

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
        # a new peer's handshake on a loaded host (32 ranks on 2 cores) can take seconds: the workers'
        # connect timeout grows with the peers, and a failed handshake is tried again (bounded)
        connect = max(5.0, 0.5 * len(self.live))
        for attempt in range(self.INSTALL_ATTEMPTS):
            try:
                self._command(self.live, lambda r: message("install", id=next(self._ids), peers=peers,
                                                            active=self.active.tolist(),
                                                            log2phy=placement.log2phy.tolist(),
                                                            connect_timeout=connect),
                              timeout=60 + connect, what="install the epoch")
                break
            except RankFailure:
                raise
            except RuntimeError as e:           # a rank could not reach a peer (PeerFailure in its reply)
                if attempt + 1 == self.INSTALL_ATTEMPTS:
                    raise RuntimeError(f"{e} (after {self.INSTALL_ATTEMPTS} attempts)") from None
                log.warning("install the epoch, attempt %d: %s; trying again", attempt + 1, e)
                time.sleep(0.5 * (attempt + 1))
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
        self.beacon.stop()
        self.server.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
