"""The controller side of the multi-process ("mooncake") runtime: one worker process per rank.

The engine's process is the controller: it starts (or admits) the workers, sends every step's rows
to the live ranks, collects their tokens, and turns failures — a failed or timed-out exchange that
workers report, a worker that does not answer, a process that exited, missed heartbeats — into a
RankFailure naming the dead ranks. Applying a new epoch is a data update on the survivors: peers
table, active mask, placement, and the expert slots to load (from a surviving replica by Mooncake
read, else from the host backup this process keeps). Every worker keeps its KV-cache slots across
epochs, and its programs: a step's per-rank shape does not depend on how many ranks are live.
The processes themselves, the control channel and the liveness evidence are runtime/workers.py's."""
from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np

from ..model.loader import EXPERT_PARAMS
from ..placement import Placement
from ..placement.movement import plan_moves
from .base import Applied
from .controller import EngineDead, RankFailure
from .control import ControlTimeout, message
from .protocol import register_messages
from .step import input_rows, out_rows
from .workers import Liveness, Workers, save_weights

log = logging.getLogger(__name__)


def _log_step_times(step: int, seconds: float, replies: dict, live: list[int]):
    """DEBUG: a step's wall time at the controller and the time it ran in each rank (its `step_s`); the
    per-rank string is built only when it is logged."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("step %d: %.3f s; in each rank %s", step, seconds,
                  " ".join(f"{r}:{replies[r].get('step_s', 0):.3f}" for r in live))


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
        self.cfg, self.source, self.dtype = cfg, source, dtype
        self.num_ranks, self.spr = num_ranks, placement.slots_per_rank
        self.placement = placement
        self.backup = backup
        # more local workers than cores: the ranks' steps are time-sliced, so the skew between a rank
        # that enters an exchange and the last peer to reach it grows with workers / cores; the
        # deadline grows with it (a killed peer is still found in milliseconds: failed writes, /proc)
        self.oversubscription = max(1.0, num_ranks / (os.cpu_count() or 1)) if spawn else 1.0
        self.exchange_timeout, self.max_rows = exchange_timeout * self.oversubscription, max_rows
        self.backend = backend
        self.moe_layer_ids = [i for i, m in enumerate(cfg.moe_layers) if m]
        self.live: list[int] = list(range(num_ranks))
        self.active = np.ones(num_ranks, np.int32)
        self._step_seq = 0
        self.epoch = 0                              # numbers every install; steps and replies carry it
        self.stale_replies = 0                      # step replies of another epoch, dropped
        self.stale_seen: dict[int, dict] = {}       # rank -> what fencing dropped there (its last reply)
        self.shapes: list = []                      # the step shapes every live worker has compiled
        self.programs: dict[int, int] = {}          # rank -> programs it had compiled at its last step
        self._step_started = time.monotonic()
        self._closed = False
        self.fleet = Workers(endpoint=endpoint, spawn=spawn, worker_host=worker_host,
                             heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
                             start_timeout=start_timeout)
        self.workers, self.liveness = self.fleet.procs, self.fleet.liveness
        try:
            # the weights for spawned workers without a checkpoint, in one file they map: without it each
            # of N workers builds the whole random model itself (one XLA compile each: at 32 workers on 2
            # cores that alone took over 5 minutes)
            self._weights_file = None
            if params is not None and spawn and not source.get("checkpoint"):
                self._weights_file = os.path.join(self.fleet.tmp, "params.npz")
                save_weights(self._weights_file, params)
            self.fleet.start(list(range(num_ranks)), self._init_fields)
            self.install(self.active, self.placement, loads={})
        except Exception:
            self.close()
            raise

    def _init_fields(self, rank: int) -> dict:
        """The model and epoch part of a worker's init message (Workers adds the channels)."""
        return dict(config=self.source["config"], dtype=self.dtype, seed=int(self.source.get("seed", 0)),
                    checkpoint=self.source.get("checkpoint"), num_ranks=self.num_ranks, slots_per_rank=self.spr,
                    max_rows=self.max_rows, phy2log=self.placement.phy2log.tolist(),
                    log2phy=self.placement.log2phy.tolist(), active=self.active.tolist(),
                    exchange_timeout=self.exchange_timeout, backend=self.backend, weights_file=self._weights_file)

    INSTALL_ATTEMPTS = 3
    STEP_HARD_LIMIT_S = Liveness.HARD_LIMIT_S

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
        compile_msg = lambda r: message("compile", id=self.fleet.next_id(), shapes=[s.as_list() for s in shapes])  # noqa: E731
        if self.fleet.tmp is not None and len(ranks) > 1:    # one compiles into the shared cache, then the rest load
            self.fleet.command(ranks[:1], compile_msg, timeout=self.fleet.start_timeout, what="compile")
            ranks = ranks[1:]
        self.fleet.command(ranks, compile_msg, timeout=self.fleet.start_timeout, what="compile")
        self.shapes = list(shapes)
        return time.perf_counter() - t

    def after_good_step(self, decide):
        pass

    def idle(self, busy):
        pass

    def _step(self, batch):
        """Sends each live rank its rows of the batch; returns (next tokens [rows], counts [Lm, E])."""
        self._step_seq += 1
        self._step_started = time.monotonic()
        self.fleet.tell_fenced_to_exit()
        per_input = input_rows(batch.shape)
        ids = {}
        for i, r in enumerate(self.live):
            part = {k: batch.rows[k][i * n:(i + 1) * n].tolist() for k, n in per_input.items()}
            msg = message("step", id=self.fleet.next_id(), epoch=self.epoch, shape=batch.shape.as_list(),
                          step=self._step_seq, **part)
            ids[msg["id"]] = r
            self.fleet.send(r, msg)
        return self._collect(ids, out_rows(batch.shape))

    prefill = decode = _step        # one program per step shape either way

    def _collect(self, ids: dict, b: int):
        """Waits until every rank has answered the step (tokens, or a report of a failed exchange) or
        is known dead (its process exited or stopped; remote: its heartbeats stopped, or a peer's
        transfer to it failed outright and its heartbeats are late: about 1 s). A rank that is
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
            self.fleet.keepalive()
            missing = ranks - set(replies) - set(reports)
            dead = {r for r in missing if self.liveness.dead_now(r)}
            # remote ranks that peers' transfers failed to outright and whose heartbeats are late too
            # are dead on that evidence (Liveness.confirm): no wait for the whole heartbeat timeout
            hit = {int(x) for m in reports.values() for x in m["direct"]}
            dead |= {r for r in missing & hit if self.workers[r].stopped() is None
                     and not self.liveness.heartbeating(r)}
            now = time.monotonic()
            if not missing - dead or now >= hard or (
                    now >= limit and not all(self.liveness.heartbeating(r) for r in missing - dead)):
                break
            try:
                inc = self.fleet.server.recv(0.01)
            except ControlTimeout:
                continue
            m = inc.msg
            if m["type"] == "reply" and m.get("epoch", self.epoch) != self.epoch:
                self.stale_replies += 1             # a rank of another epoch (cut off, then back)
                continue
            if m["type"] != "reply" or m["id"] not in ids:
                continue
            r = ids[m["id"]]
            if "stale" in m:
                self.stale_seen[r] = m["stale"]
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
            ok, why = self.liveness.confirm(r, named.get(r, set()), r in unanswered, self._step_started)
            (confirmed if ok else doubted)[r] = why
        if doubted:
            log.warning("step %d: suspected but alive (not fenced): %s", self._step_seq,
                        "; ".join(f"rank {r}: {e}" for r, e in doubted.items()))
        said = "; ".join(f"rank {r} reported: {m.get('reason', '')[:160]}" for r, m in sorted(reports.items())[:2])
        reason = "; ".join(f"rank {r}: {e}" for r, e in confirmed.items()) or (
            f"step {self._step_seq} failed with every rank alive ({len(reports)} of {len(ranks)} ranks reported a "
            f"failed exchange{': ' + said if said else ''})"
            + ("; " + "; ".join(f"rank {r}: {e}" for r, e in doubted.items()) if doubted else ""))
        raise self.fleet.failure(confirmed, reason)

    def _merge(self, replies: dict, b: int):
        n = len(self.live)
        out = np.zeros(n * b, np.int32)
        counts = np.zeros((len(self.moe_layer_ids), self.cfg.num_experts), np.int64)
        for i, r in enumerate(self.live):
            out[i * b:(i + 1) * b] = replies[r]["tokens"]
            counts += np.asarray(replies[r]["counts"], np.int64).reshape(counts.shape)
            self.programs[r] = int(replies[r]["programs"])
        _log_step_times(self._step_seq, time.monotonic() - self._step_started, replies, self.live)
        return out, counts

    # -- epochs ---------------------------------------------------------------------------------------
    def stale_counts(self) -> dict:
        """What fencing dropped: exchange signals and steps of another epoch at the workers (summed
        over the ranks' last replies); here, step replies of another epoch and heartbeats of fenced
        processes; and how many fenced processes were told to exit."""
        return {"signals": sum(int(v.get("signals", 0)) for v in self.stale_seen.values()),
                "messages": sum(int(v.get("messages", 0)) for v in self.stale_seen.values()),
                "replies": self.stale_replies, "heartbeats": self.fleet.stale_heartbeats,
                "fenced_told_to_exit": self.fleet.told_to_exit}

    def fence(self, ranks):
        """Makes sure ranks declared dead are dead (a paused or dropping process must not come back)."""
        self.fleet.fence(ranks)

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
        self.epoch += 1
        self.active = np.asarray(active, np.int32)
        self.live = [r for r in range(self.num_ranks) if self.active[r]]
        peers = {str(r): self.workers[r].address for r in self.live}
        # a new peer's handshake on a loaded host (32 ranks on 2 cores) can take seconds: the workers'
        # connect timeout grows with the peers, and a failed handshake is tried again (bounded)
        connect = max(5.0, 0.5 * len(self.live))
        for attempt in range(self.INSTALL_ATTEMPTS):
            try:
                install = dict(epoch=self.epoch, peers=peers, active=self.active.tolist(),
                               log2phy=placement.log2phy.tolist(), connect_timeout=connect)
                self.fleet.command(self.live, lambda r: message("install", id=self.fleet.next_id(), **install),
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
            self.fleet.command(self.live, lambda r: message("load", id=self.fleet.next_id(), epoch=self.epoch,
                                                            loads=plan.get(r, [])),
                               timeout=120, what="load expert weights")
            self.fleet.command(self.live, lambda r: message("commit", id=self.fleet.next_id(), epoch=self.epoch),
                               timeout=60, what="commit expert weights")
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
        self.fleet.restart(rank, self._init_fields(rank))

    def inject(self, rank: int, how: str, delay_s: float = 1.0):
        """Fault injection: kill (SIGKILL), hang (SIGSTOP), slow (delays its exchanges), drop (its
        transfers fail)."""
        w = self.workers[rank]
        if how in ("kill", "hang") and w.proc is None:
            raise ValueError(f"rank {rank} runs on another host: the controller cannot {how} it (inject 'slow' "
                             f"or 'drop', or kill it where it runs)")
        self.fleet.injected_at[rank] = time.perf_counter()
        if how == "kill":
            w.signal(signal.SIGKILL)
        elif how == "hang":
            w.signal(signal.SIGSTOP)
        else:
            self.fleet.command([rank], lambda r: message("fault", id=self.fleet.next_id(), how=how, delay_s=delay_s),
                          timeout=30, what=f"inject {how}")

    def close(self):
        if self._closed:
            return
        self._closed = True
        if hasattr(self, "fleet"):
            self.fleet.close()
