"""The controller: membership epochs, the recovery decision, and the record of each recovery.

It is the single authority on which ranks take part. Both runtime modes use it; only "apply the
epoch" differs (spmd: a new mesh and a recompile; mooncake: a data update on the workers). It works
in the global rank numbering: a dead rank keeps its number and its slots become empty."""
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
    moved_experts: int = 0
    restored_from_backup: int = 0
    requests_requeued: int = 0
    precompiled: bool = False
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


def compact(placement: Placement, alive: np.ndarray) -> Placement:
    """The placement over the alive ranks only, renumbered 0..N'-1 in rank order (spmd: the new mesh)."""
    alive = np.asarray(alive, bool)
    cols = np.nonzero(np.repeat(alive, placement.slots_per_rank))[0]
    return Placement.from_phy2log(placement.phy2log[:, cols], placement.num_logical, int(alive.sum()),
                                  placement.max_replicas)
