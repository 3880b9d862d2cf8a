"""The placement of logical experts on physical slots, and its invariants.

Shapes (L = MoE layers, E = logical experts, S = physical slots = num_ranks * slots_per_rank,
R = max replicas of one expert):
  phy2log [L, S]     int32, logical expert held by each slot, -1 for an empty slot
  log2phy [L, E, R]  int32, the slots holding each logical expert, ascending, padded with -1
  logcnt  [L, E]     int32, number of replicas of each logical expert
Slot s lives on rank s // slots_per_rank. Slot numbering is global and never changes when ranks
die: a dead rank's slots become empty.
"""
from __future__ import annotations

import dataclasses

import numpy as np


class PlacementError(ValueError):
    """A placement breaks one of its invariants, or none can be built."""


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    num_ranks: int
    slots_per_rank: int

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_logical(self) -> int:
        return int(self.logcnt.shape[1])

    @property
    def max_replicas(self) -> int:
        return int(self.log2phy.shape[2])

    def slot_rank(self) -> np.ndarray:
        """[S] int32: the rank that holds each slot."""
        return (np.arange(self.num_slots) // self.slots_per_rank).astype(np.int32)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Placement) and self.num_ranks == other.num_ranks
                and self.slots_per_rank == other.slots_per_rank
                and np.array_equal(self.phy2log, other.phy2log)
                and np.array_equal(self.log2phy, other.log2phy)
                and np.array_equal(self.logcnt, other.logcnt))

    @classmethod
    def from_phy2log(cls, phy2log, num_logical: int, num_ranks: int,
                     max_replicas: int | None = None) -> "Placement":
        """Builds log2phy and logcnt from phy2log [L, S] (-1 = empty slot).

        max_replicas pads log2phy to a fixed width so that placements of one engine share
        shapes (a jitted step taking them never recompiles); default: the largest count."""
        phy2log = np.asarray(phy2log, dtype=np.int32)
        if phy2log.ndim != 2:
            raise PlacementError(f"phy2log must be [layers, slots], got shape {phy2log.shape}")
        num_layers, num_slots = phy2log.shape
        if num_ranks < 1:
            raise PlacementError(f"num_ranks must be >= 1, got {num_ranks}")
        if num_slots % num_ranks:
            raise PlacementError(f"{num_slots} slots do not divide over {num_ranks} ranks")
        if phy2log.max(initial=-1) >= num_logical or phy2log.min(initial=0) < -1:
            raise PlacementError(f"phy2log holds ids outside [-1, {num_logical})")
        logcnt = replica_counts(phy2log, num_logical)
        width = int(logcnt.max(initial=1)) if max_replicas is None else int(max_replicas)
        if width < 1:
            raise PlacementError(f"max_replicas must be >= 1, got {width}")
        if logcnt.max(initial=0) > width:
            raise PlacementError(f"an expert has {logcnt.max()} replicas, more than max_replicas={width}")
        log2phy = np.full((num_layers, num_logical, width), -1, np.int32)
        # sort the held slots by (layer, expert, slot); a slot's column is its rank among its expert's
        layer_of, slot_of = np.nonzero(phy2log >= 0)
        key = (layer_of.astype(np.int64) * num_logical + phy2log[layer_of, slot_of]) * num_slots + slot_of
        order = np.argsort(key, kind="stable")
        layer_of, slot_of = layer_of[order], slot_of[order]
        expert_of = phy2log[layer_of, slot_of]
        run = layer_of.astype(np.int64) * num_logical + expert_of
        column = np.arange(len(run)) - np.searchsorted(run, run, side="left")
        log2phy[layer_of, expert_of, column] = slot_of
        return cls(phy2log, log2phy, logcnt, int(num_ranks), num_slots // int(num_ranks))

    def with_max_replicas(self, width: int) -> "Placement":
        """The same placement with log2phy padded (or trimmed) to `width` replica columns."""
        return Placement.from_phy2log(self.phy2log, self.num_logical, self.num_ranks, width)

    def live_logcnt(self, alive) -> np.ndarray:
        """[L, E] int32: replicas of each logical expert on alive ranks."""
        alive = np.asarray(alive, dtype=bool)
        if alive.shape != (self.num_ranks,):
            raise PlacementError(f"alive must have shape ({self.num_ranks},), got {alive.shape}")
        live = np.where(alive[self.slot_rank()][None, :], self.phy2log, -1)
        return replica_counts(live, self.num_logical)

    def rank_loads(self, loads) -> np.ndarray:
        """[L, num_ranks] float64: the load each rank serves, loads [L, E] split evenly over replicas."""
        return rank_loads(self.phy2log, loads, self.slots_per_rank)

    def imbalance(self, loads, alive=None) -> np.ndarray:
        """[L] float64: max / mean rank load over the alive ranks (1.0 for a layer without load)."""
        return imbalance(self.phy2log, loads, self.slots_per_rank, alive)


def replica_counts(phy2log, num_logical: int) -> np.ndarray:
    """phy2log [L, S] (-1 = empty) -> [L, num_logical] int32: replicas of each logical expert."""
    phy2log = np.asarray(phy2log)
    num_layers = phy2log.shape[0]
    layer_of, slot_of = np.nonzero(phy2log >= 0)
    flat = layer_of.astype(np.int64) * num_logical + phy2log[layer_of, slot_of]
    counts = np.bincount(flat, minlength=num_layers * num_logical)
    return counts.reshape(num_layers, num_logical).astype(np.int32)


def rank_loads(phy2log, loads, slots_per_rank: int) -> np.ndarray:
    """phy2log [L, S], loads [L, E] -> [L, S // slots_per_rank] float64: each rank's share of the load,
    a logical expert's load split evenly over its replicas (as the engine spreads tokens)."""
    phy2log = np.asarray(phy2log)
    loads = np.asarray(loads, dtype=np.float64)
    num_layers, num_slots = phy2log.shape
    if loads.shape[0] != num_layers:
        raise PlacementError(f"loads has {loads.shape[0]} layers, the placement {num_layers}")
    counts = replica_counts(phy2log, loads.shape[1])
    per_replica = loads / np.maximum(counts, 1)
    held = np.maximum(phy2log, 0)
    slot_load = np.where(phy2log >= 0, np.take_along_axis(per_replica, held, axis=1), 0.0)
    return slot_load.reshape(num_layers, num_slots // slots_per_rank, slots_per_rank).sum(-1)


def imbalance(phy2log, loads, slots_per_rank: int, alive=None) -> np.ndarray:
    """phy2log [L, S], loads [L, E], alive [N] bool or None -> [L] float64: max / mean of the alive
    ranks' loads (1.0 for a layer without load). 1.0 is perfect balance."""
    per_rank = rank_loads(phy2log, loads, slots_per_rank)
    if alive is not None:
        per_rank = per_rank[:, np.asarray(alive, dtype=bool)]
    mean = per_rank.mean(axis=1)
    return np.where(mean > 0, per_rank.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


def validate(placement: Placement, alive=None) -> Placement:
    """Checks every invariant of `placement`; raises PlacementError naming the first one broken.

    alive: [num_ranks] bool or None (all alive). With `alive`, every logical expert must keep a
    replica on an alive rank and no expert may sit on a dead rank's slot. Returns the placement."""
    p = placement
    if p.num_ranks < 1 or p.slots_per_rank < 1:
        raise PlacementError(f"num_ranks={p.num_ranks} and slots_per_rank={p.slots_per_rank} must be >= 1")
    if p.phy2log.ndim != 2 or p.log2phy.ndim != 3 or p.logcnt.ndim != 2:
        raise PlacementError("phy2log must be [L, S], log2phy [L, E, R], logcnt [L, E]")
    num_layers, num_slots = p.phy2log.shape
    if num_slots != p.num_ranks * p.slots_per_rank:
        raise PlacementError(f"phy2log has {num_slots} slots, expected num_ranks*slots_per_rank = "
                             f"{p.num_ranks * p.slots_per_rank}")
    if p.log2phy.shape[:2] != p.logcnt.shape or p.logcnt.shape[0] != num_layers:
        raise PlacementError(f"shapes disagree: phy2log {p.phy2log.shape}, log2phy {p.log2phy.shape}, "
                             f"logcnt {p.logcnt.shape}")
    num_logical = p.logcnt.shape[1]
    if p.phy2log.min(initial=0) < -1 or p.phy2log.max(initial=-1) >= num_logical:
        raise PlacementError(f"phy2log holds ids outside [-1, {num_logical})")
    rebuilt = Placement.from_phy2log(p.phy2log, num_logical, p.num_ranks, p.max_replicas)
    if not np.array_equal(rebuilt.logcnt, p.logcnt):
        layer, expert = np.argwhere(rebuilt.logcnt != p.logcnt)[0]
        raise PlacementError(f"logcnt[{layer}, {expert}] = {p.logcnt[layer, expert]} but phy2log holds "
                             f"{rebuilt.logcnt[layer, expert]} replicas")
    if not np.array_equal(rebuilt.log2phy, p.log2phy):
        layer, expert = np.argwhere((rebuilt.log2phy != p.log2phy).any(-1))[0]
        raise PlacementError(f"log2phy[{layer}, {expert}] = {p.log2phy[layer, expert].tolist()} disagrees "
                             f"with phy2log (expected {rebuilt.log2phy[layer, expert].tolist()})")
    if (p.logcnt < 1).any():
        layer, expert = np.argwhere(p.logcnt < 1)[0]
        raise PlacementError(f"logical expert {expert} of layer {layer} has no replica")
    if alive is not None:
        alive = np.asarray(alive, dtype=bool)
        if alive.shape != (p.num_ranks,):
            raise PlacementError(f"alive must have shape ({p.num_ranks},), got {alive.shape}")
        dead_slots = ~alive[p.slot_rank()]
        if (p.phy2log[:, dead_slots] >= 0).any():
            layer, col = np.argwhere(p.phy2log[:, dead_slots] >= 0)[0]
            slot = np.nonzero(dead_slots)[0][col]
            raise PlacementError(f"slot {slot} of layer {layer} holds an expert on dead rank "
                                 f"{slot // p.slots_per_rank}")
    return p
