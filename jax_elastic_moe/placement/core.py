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

    def ranks_used(self) -> np.ndarray:
        """[num_ranks] bool: ranks holding at least one expert in some layer."""
        held = (self.phy2log >= 0).reshape(self.num_layers, self.num_ranks, self.slots_per_rank)
        return held.any(axis=(0, 2))

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
        if num_slots % num_ranks:
            raise PlacementError(f"{num_slots} slots do not divide over {num_ranks} ranks")
        if phy2log.max(initial=-1) >= num_logical or phy2log.min(initial=0) < -1:
            raise PlacementError(f"phy2log holds ids outside [-1, {num_logical})")
        logcnt = np.zeros((num_layers, num_logical), np.int32)
        for layer in range(num_layers):
            held = phy2log[layer][phy2log[layer] >= 0]
            logcnt[layer] = np.bincount(held, minlength=num_logical)
        width = int(logcnt.max(initial=1)) if max_replicas is None else int(max_replicas)
        if logcnt.max(initial=0) > width:
            raise PlacementError(f"an expert has {logcnt.max()} replicas, more than max_replicas={width}")
        log2phy = np.full((num_layers, num_logical, max(width, 1)), -1, np.int32)
        for layer in range(num_layers):
            slots = np.nonzero(phy2log[layer] >= 0)[0]
            order = np.argsort(phy2log[layer][slots], kind="stable")
            slots = slots[order]
            experts = phy2log[layer][slots]
            first = np.searchsorted(experts, experts, side="left")
            log2phy[layer, experts, np.arange(len(slots)) - first] = slots
        return cls(phy2log, log2phy, logcnt, int(num_ranks), num_slots // int(num_ranks))

    def with_max_replicas(self, width: int) -> "Placement":
        """The same placement with log2phy padded (or trimmed) to `width` replica columns."""
        return Placement.from_phy2log(self.phy2log, self.num_logical, self.num_ranks, width)

    def live_logcnt(self, alive) -> np.ndarray:
        """[L, E] int32: replicas of each logical expert on alive ranks."""
        alive = np.asarray(alive, dtype=bool)
        live_slot = (self.phy2log >= 0) & alive[self.slot_rank()][None, :]
        out = np.zeros((self.num_layers, self.num_logical), np.int32)
        for layer in range(self.num_layers):
            out[layer] = np.bincount(self.phy2log[layer][live_slot[layer]], minlength=self.num_logical)
        return out


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
