"""The controller: membership epochs, the recovery and rejoin decisions, and the record of each.

It is the single authority on which ranks take part. Both runtime modes use it; only "apply the
epoch" differs (Runtime.apply_epoch: spmd, a new mesh over the survivors; mooncake, a data update on
the workers). It works in the global rank numbering: a dead rank keeps its number and its slots
become empty."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..placement import Placement, PlacementError, rebalance


class RankFailure(RuntimeError):
    """Ranks failed (or were found dead) during a step; the step is abandoned and run again."""

    def __init__(self, ranks, reason: str = "", detected_at: float | None = None):
        self.ranks = sorted(set(int(r) for r in ranks))
        self.reason = reason
        self.detected_at = time.perf_counter() if detected_at is None else detected_at
        self.failed_at = self.detected_at   # when the failure happened, where known (injection)
        super().__init__(f"ranks {self.ranks} failed: {reason}" if reason else f"ranks {self.ranks} failed")


class EngineDead(RuntimeError):
    """The survivors cannot serve (too few ranks to hold every expert): the engine has stopped."""


@dataclasses.dataclass
class Epoch:
    number: int
    active: np.ndarray          # [num_ranks] int32 0/1, global numbering
    placement_version: int


@dataclasses.dataclass
class RecoveryRecord:
    epoch: int
    failed_ranks: list[int]
    detect_s: float = 0.0       # failure injected/happened -> the engine knew
    decide_s: float = 0.0       # new epoch and placement computed
    restore_s: float = 0.0      # expert weights moved / restored, new mesh or workers updated
    compile_s: float = 0.0      # programs for the new mesh (0 when precompiled or data-only)
    resume_s: float = 0.0       # interrupted step run again (re-prefill of the requests in flight)
    total_s: float = 0.0        # last good step before the failure -> first good step after
    resumed_at: float = 0.0     # time.perf_counter() of that first good step
    moved_experts: int = 0
    restored_from_backup: int = 0
    requests_requeued: int = 0
    precompiled: bool = False
    cache_kept: bool = True     # the survivors kept their KV caches (False: every request re-prefilled)
    evidence: str = ""          # why each failed rank was declared dead

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Controller:
    """Decides epochs and placements over `num_ranks` global ranks."""

    def __init__(self, num_ranks: int, slots_per_rank: int, max_replicas: int, policy: str = "round_robin"):
        self.num_ranks, self.slots_per_rank = num_ranks, slots_per_rank
        self.max_replicas, self.policy = max_replicas, policy
        self.epoch = Epoch(0, np.ones(num_ranks, np.int32), 0)
        self.records: list[RecoveryRecord] = []
        self.placement: Placement | None = None     # the current placement, global rank numbering
        self.active = np.ones(num_ranks, np.int32)  # the ranks taking part (alive, and not set inactive)

    @property
    def alive(self) -> np.ndarray:
        return self.epoch.active.astype(bool)

    def decide(self, dead_ranks, loads: np.ndarray, current: Placement) -> tuple[Epoch, Placement]:
        """The next epoch without `dead_ranks`, and a placement over the survivors that keeps experts
        where they are when it can. Raises EngineDead when the survivors cannot hold every expert."""
        alive = self.alive.copy()
        for r in dead_ranks:
            if not 0 <= r < self.num_ranks:
                raise ValueError(f"rank {r} does not exist (0..{self.num_ranks - 1})")
            alive[r] = False
        if not alive.any():
            raise EngineDead("every rank has failed")
        try:
            placement = rebalance(np.asarray(loads, np.float64) + 1.0, self.num_ranks, self.slots_per_rank,
                                  policy=self.policy, alive=alive, previous=current,
                                  max_replicas=self.max_replicas)
        except PlacementError as e:
            raise EngineDead(f"cannot serve after the failure of ranks {sorted(dead_ranks)}: {e}") from None
        epoch = Epoch(self.epoch.number + 1, alive.astype(np.int32), self.epoch.placement_version + 1)
        return epoch, placement

    def install(self, epoch: Epoch):
        self.epoch = epoch

    def fit(self, p: Placement, num_layers: int, num_experts: int) -> Placement:
        """`p` checked against this engine's ranks, slots, layers, experts and replicas (padded to
        max_replicas)."""
        if p.num_ranks != self.num_ranks or p.slots_per_rank != self.slots_per_rank:
            raise PlacementError(f"placement is for {p.num_ranks} ranks x {p.slots_per_rank} slots, the engine "
                                 f"has {self.num_ranks} x {self.slots_per_rank}")
        if p.num_layers != num_layers or p.num_logical != num_experts:
            raise PlacementError(f"placement covers {p.num_layers} layers x {p.num_logical} experts, the model "
                                 f"has {num_layers} x {num_experts}")
        if p.logcnt.max(initial=0) > self.max_replicas:
            raise PlacementError(f"an expert has {p.logcnt.max()} replicas; at most {self.max_replicas} fit")
        return p if p.max_replicas == self.max_replicas else p.with_max_replicas(self.max_replicas)

    @staticmethod
    def check_live(p: Placement, active: np.ndarray):
        """Every logical expert has a replica on an active rank."""
        live = p.live_logcnt(np.asarray(active).astype(bool))
        if (live < 1).any():
            layer, expert = np.argwhere(live < 1)[0]
            raise PlacementError(f"logical expert {expert} of MoE layer {layer} has no replica on an active rank")

    def recover(self, failure: RankFailure, runtime, loads: np.ndarray) -> RecoveryRecord:
        """Decides the epoch without the failed ranks and has `runtime` apply it. Returns the record
        (resume_s and total_s are filled in by the first good step after). Raises EngineDead when the
        survivors cannot serve, RankFailure when another rank dies while the epoch is applied."""
        t0 = time.perf_counter()
        rec = RecoveryRecord(epoch=0, failed_ranks=failure.ranks, detect_s=failure.detected_at - failure.failed_at,
                             evidence=failure.reason[:500])
        try:
            epoch, placement = self.decide(failure.ranks, loads, self.placement)
        except EngineDead as e:
            raise EngineDead(f"{e} (evidence: {failure.reason[:300]})") from None
        t1 = time.perf_counter()
        rec.decide_s, rec.epoch = t1 - t0, epoch.number
        applied = runtime.apply_epoch(epoch.active, placement, failure.ranks)
        rec.compile_s, rec.precompiled = applied.compile_s, applied.precompiled
        rec.moved_experts = sum(n for kind, n in applied.moves.items() if kind != "kept")
        rec.restored_from_backup = applied.moves.get("backup", 0)
        rec.restore_s = time.perf_counter() - t1 - applied.compile_s
        rec.cache_kept = applied.cache_kept
        self.install(epoch)
        self.placement, self.active = placement, epoch.active.copy()
        self.records.append(rec)
        return rec

    def rejoin(self, rank: int, runtime, loads: np.ndarray):
        """Brings dead `rank` back: a fresh process, then an epoch whose placement (a rebalance close to
        `current`) gives it slots, loaded from its peers or the host backup."""
        if not 0 <= rank < self.num_ranks or self.alive[rank]:
            raise ValueError(f"rank {rank} is not a dead rank")
        runtime.restart(rank)
        alive = self.alive.copy()
        alive[rank] = True
        placement = rebalance(np.asarray(loads, np.float64) + 1.0, self.num_ranks, self.slots_per_rank,
                              policy=self.policy, alive=alive, previous=self.placement, max_replicas=self.max_replicas)
        runtime.apply_epoch(alive.astype(np.int32), placement, [], fresh=[rank])
        self.install(Epoch(self.epoch.number + 1, alive.astype(np.int32), self.epoch.placement_version + 1))
        self.placement, self.active = placement, alive.astype(np.int32)

    def apply(self, active: np.ndarray, placement: Placement, runtime):
        """A placement or active mask chosen by the user, over the same alive ranks: data only."""
        self.check_live(placement, active)
        runtime.set_placement(active, placement)
        self.placement, self.active = placement, np.asarray(active, np.int32)


def compact(placement: Placement, alive: np.ndarray) -> Placement:
    """The placement over the alive ranks only, renumbered 0..N'-1 in rank order (spmd: the new mesh)."""
    alive = np.asarray(alive, bool)
    cols = np.nonzero(np.repeat(alive, placement.slots_per_rank))[0]
    return Placement.from_phy2log(placement.phy2log[:, cols], placement.num_logical, int(alive.sum()),
                                  placement.max_replicas)
