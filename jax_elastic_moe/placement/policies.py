"""Placement policies: pure numpy functions from loads to a Placement, chosen by name."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .core import Placement, PlacementError, validate

# policy(loads [L, E] float, num_ranks, slots_per_rank, alive [N] bool, num_nodes, num_groups,
#        previous Placement | None) -> phy2log [L, N * slots_per_rank] int32 (-1 = empty)
PolicyFn = Callable[..., np.ndarray]
_POLICIES: dict[str, PolicyFn] = {}


def register_policy(name: str, fn: PolicyFn | None = None):
    """Registers a placement policy under `name` (usable as a decorator)."""
    def deco(f):
        _POLICIES[name] = f
        return f
    return deco(fn) if fn is not None else deco


def policies() -> list[str]:
    return sorted(_POLICIES)


def alive_slots(num_ranks: int, slots_per_rank: int, alive) -> np.ndarray:
    """The global ids of the slots on alive ranks, ascending."""
    alive = np.ones(num_ranks, bool) if alive is None else np.asarray(alive, bool)
    return np.nonzero(np.repeat(alive, slots_per_rank))[0]


def check_capacity(num_logical: int, num_ranks: int, slots_per_rank: int, alive) -> np.ndarray:
    """Returns the alive slots; raises if they cannot hold one replica of every logical expert."""
    slots = alive_slots(num_ranks, slots_per_rank, alive)
    if len(slots) < num_logical:
        n_alive = len(slots) // slots_per_rank
        raise PlacementError(
            f"{n_alive} alive ranks hold {len(slots)} slots, {num_logical - len(slots)} too few for "
            f"{num_logical} logical experts (each needs at least one replica)")
    return slots


@register_policy("round_robin")
def round_robin(loads, num_ranks, slots_per_rank, alive=None, **_):
    """Fills the alive slots rank after rank with experts 0, 1, ..., E-1, 0, 1, ...: the replicas
    of one expert land on different ranks whenever E >= slots_per_rank. Ignores the loads."""
    num_layers, num_logical = np.shape(loads)
    slots = check_capacity(num_logical, num_ranks, slots_per_rank, alive)
    phy2log = np.full((num_layers, num_ranks * slots_per_rank), -1, np.int32)
    phy2log[:, slots] = np.arange(len(slots)) % num_logical
    return phy2log


def rebalance(loads, num_ranks: int, slots_per_rank: int, policy: str = "round_robin", alive=None,
              num_nodes: int = 1, num_groups: int = 1, previous: Placement | None = None,
              max_replicas: int | None = None) -> Placement:
    """A new placement of L layers' E logical experts over num_ranks * slots_per_rank slots.

    loads: [L, E] token counts per logical expert (any non-negative numbers).
    alive: [num_ranks] bool, None = all alive; dead ranks' slots stay empty.
    max_replicas: width of log2phy (keep an engine's placements one shape); default the largest count."""
    if policy not in _POLICIES:
        raise KeyError(f"unknown placement policy {policy!r}; registered: {policies()}")
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 2:
        raise PlacementError(f"loads must be [layers, logical experts], got shape {loads.shape}")
    phy2log = _POLICIES[policy](loads, num_ranks=num_ranks, slots_per_rank=slots_per_rank, alive=alive,
                                num_nodes=num_nodes, num_groups=num_groups, previous=previous)
    p = Placement.from_phy2log(phy2log, loads.shape[1], num_ranks, max_replicas)
    return validate(p, alive)
