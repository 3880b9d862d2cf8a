"""Placement policies: pure numpy functions from loads to a Placement, chosen by name.

A policy is called with keyword arguments and returns phy2log:
    policy(loads,            # [L, E] float64, non-negative token counts per logical expert
           num_ranks, slots_per_rank,
           alive,            # [N] bool (never None when called through `rebalance`)
           num_nodes, num_groups,
           previous,         # Placement or None: the placement to stay close to
           max_replicas,     # int or None: no expert may get more replicas than this
           stay_tolerance,   # float: relative balance a policy may give up to keep experts in place
           ) -> phy2log [L, num_ranks * slots_per_rank] int (-1 = empty slot)
A user policy should accept **kwargs for arguments it does not use; `rebalance` checks the result.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .core import Placement, PlacementError, validate
from .eplb import fresh_plan, held_by_rank, place_in_slots, relabel_packs, stay_plan
from .movement import closest_plan

PolicyFn = Callable[..., np.ndarray]
_POLICIES: dict[str, PolicyFn] = {}

# Keep an expert where it is when that costs at most 2% of max/mean balance.
DEFAULT_STAY_TOLERANCE = 0.02


class UnknownPolicyError(PlacementError, KeyError):
    """No policy is registered under the name asked for."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_policy(name: str, fn: PolicyFn | None = None):
    """Registers a placement policy under `name` (usable as a decorator); replaces one of that name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a policy name must be a non-empty string, got {name!r}")

    def deco(f):
        if not callable(f):
            raise TypeError(f"policy {name!r} must be callable, got {type(f).__name__}")
        _POLICIES[name] = f
        return f
    return deco(fn) if fn is not None else deco


def policies() -> list[str]:
    """The names of the registered policies, sorted."""
    return sorted(_POLICIES)


def alive_mask(num_ranks: int, alive) -> np.ndarray:
    """alive: [num_ranks] bool-like or None (all alive) -> [num_ranks] bool, checked."""
    if alive is None:
        return np.ones(num_ranks, bool)
    mask = np.asarray(alive)
    if mask.shape != (num_ranks,):
        raise PlacementError(f"alive must have shape ({num_ranks},), got {mask.shape}")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise PlacementError("alive must hold booleans (or 0/1)")
    return mask.astype(bool)


def alive_slots(num_ranks: int, slots_per_rank: int, alive) -> np.ndarray:
    """The global ids of the slots on alive ranks, ascending."""
    return np.nonzero(np.repeat(alive_mask(num_ranks, alive), slots_per_rank))[0]


def check_capacity(num_logical: int, num_ranks: int, slots_per_rank: int, alive) -> np.ndarray:
    """Returns the alive slots; raises if they cannot hold one replica of every logical expert."""
    slots = alive_slots(num_ranks, slots_per_rank, alive)
    if len(slots) < num_logical:
        n_alive = len(slots) // slots_per_rank
        raise PlacementError(
            f"{n_alive} alive ranks hold {len(slots)} slots, {num_logical - len(slots)} too few for "
            f"{num_logical} logical experts (each needs at least one replica)")
    return slots


def _keep_close(phy2log, previous: Placement | None, num_ranks, slots_per_rank, alive):
    """Renumbers the alive ranks of a load-blind plan and orders each rank's slots so that as many
    experts as possible stay where `previous` had them. phy2log [L, N * S] -> [L, N * S]."""
    if previous is None:
        return phy2log
    num_logical = previous.num_logical
    slots = alive_slots(num_ranks, slots_per_rank, alive)
    ranks = np.nonzero(alive)[0]
    item_expert = phy2log[:, slots]
    pack = np.broadcast_to(np.arange(len(slots)) // slots_per_rank, item_expert.shape)
    before = held_by_rank(previous.phy2log, num_ranks, slots_per_rank, num_logical)[:, ranks, :]
    pack = relabel_packs(pack, item_expert, num_logical, before)
    return place_in_slots(ranks[pack], item_expert, num_ranks, slots_per_rank, num_logical,
                          previous.phy2log)


@register_policy("round_robin")
def round_robin(loads, num_ranks, slots_per_rank, alive=None, previous=None, max_replicas=None, **_):
    """Fills the alive slots rank after rank with experts 0, 1, ..., E-1, 0, 1, ...: the replicas
    of one expert land on different ranks whenever E >= slots_per_rank. Ignores the loads. With
    max_replicas, the slots past E * max_replicas stay empty. With `previous`, ranks are renumbered
    and slots reordered to keep experts in place (same balance)."""
    num_layers, num_logical = np.shape(loads)
    alive = alive_mask(num_ranks, alive)
    slots = check_capacity(num_logical, num_ranks, slots_per_rank, alive)
    expert = np.arange(len(slots)) % num_logical
    if max_replicas is not None:
        expert = np.where(np.arange(len(slots)) < num_logical * int(max_replicas), expert, -1)
    phy2log = np.full((num_layers, num_ranks * slots_per_rank), -1, np.int32)
    phy2log[:, slots] = expert
    return _keep_close(phy2log, previous, num_ranks, slots_per_rank, alive)


@register_policy("deepseek_hierarchical")
def deepseek_hierarchical(loads, num_ranks, slots_per_rank, alive=None, num_nodes=1, num_groups=1,
                          previous=None, max_replicas=None, stay_tolerance=DEFAULT_STAY_TOLERANCE, **_):
    """DeepSeek's hierarchical EPLB: expert groups packed to nodes, experts replicated within each
    node (most loaded per replica first), replicas packed to the node's alive ranks.

    loads [L, E]; num_groups divides E; num_nodes divides num_ranks; ranks r of node i satisfy
    r // (num_ranks // num_nodes) == i. A node takes groups in proportion to its alive slots; when
    groups cannot stay whole on the nodes, the cluster is balanced as one node. With `previous`,
    the plan that packs towards it is taken per layer when its max/mean load is within
    (1 + stay_tolerance) of the freely packed plan (renumbered to match), else the latter."""
    loads = np.asarray(loads, dtype=np.float64)
    num_logical = loads.shape[1]
    if num_groups < 1 or num_logical % num_groups:
        raise PlacementError(f"num_groups={num_groups} must be >= 1 and divide the {num_logical} experts")
    if num_nodes < 1 or num_ranks % num_nodes:
        raise PlacementError(f"num_nodes={num_nodes} must be >= 1 and divide the {num_ranks} ranks")
    alive = alive_mask(num_ranks, alive)
    check_capacity(num_logical, num_ranks, slots_per_rank, alive)
    before = None if previous is None else previous.phy2log
    shape = dict(num_ranks=num_ranks, slots_per_rank=slots_per_rank, alive=alive, num_nodes=num_nodes,
                 num_groups=num_groups, max_replicas=max_replicas)
    fresh = fresh_plan(loads, **shape, previous=before)
    if previous is None:
        return fresh
    stay = stay_plan(loads, **shape, previous=before, fresh=fresh, tolerance=stay_tolerance)
    return closest_plan(before, [stay, fresh], loads, slots_per_rank, alive, stay_tolerance)


@register_policy("deepseek_global")
def deepseek_global(loads, num_ranks, slots_per_rank, alive=None, previous=None, max_replicas=None,
                    stay_tolerance=DEFAULT_STAY_TOLERANCE, **_):
    """DeepSeek's global EPLB: experts replicated over all alive slots (most loaded per replica
    first), replicas packed to the alive ranks, heaviest first onto the least loaded rank. With
    `previous`, see deepseek_hierarchical."""
    return deepseek_hierarchical(loads, num_ranks, slots_per_rank, alive=alive, num_nodes=1,
                                 num_groups=1, previous=previous, max_replicas=max_replicas,
                                 stay_tolerance=stay_tolerance)


def _check_previous(previous, num_layers, num_logical, num_ranks, slots_per_rank):
    if previous is None:
        return
    if not isinstance(previous, Placement):
        raise PlacementError(f"previous must be a Placement or None, got {type(previous).__name__}")
    if (previous.num_layers, previous.num_logical, previous.num_ranks, previous.slots_per_rank) != (
            num_layers, num_logical, num_ranks, slots_per_rank):
        raise PlacementError(
            f"previous placement has {previous.num_layers} layers, {previous.num_logical} experts, "
            f"{previous.num_ranks} ranks x {previous.slots_per_rank} slots; expected {num_layers}, "
            f"{num_logical}, {num_ranks} x {slots_per_rank}")


def rebalance(loads, num_ranks: int, slots_per_rank: int, policy: str = "round_robin", alive=None,
              num_nodes: int = 1, num_groups: int = 1, previous: Placement | None = None,
              max_replicas: int | None = None, stay_tolerance: float = DEFAULT_STAY_TOLERANCE) -> Placement:
    """A new placement of L layers' E logical experts over num_ranks * slots_per_rank slots.

    loads: [L, E] token counts per logical expert (any non-negative finite numbers).
    policy: a registered name ("round_robin", "deepseek_global", "deepseek_hierarchical", ...).
    alive: [num_ranks] bool, None = all alive; dead ranks' slots stay empty, slot numbers unchanged.
    num_nodes, num_groups: for deepseek_hierarchical (ranks per node = num_ranks // num_nodes).
    previous: a Placement of the same shape to stay close to (fewer expert weights to move).
    max_replicas: width of log2phy (keep an engine's placements one shape); no expert gets more
        replicas, slots beyond E * max_replicas stay empty. Default: the largest count.
    stay_tolerance: with `previous`, the relative max/mean balance given up to keep experts in place.
    Raises PlacementError naming the problem for bad input or too few alive slots."""
    if policy not in _POLICIES:
        raise UnknownPolicyError(f"unknown placement policy {policy!r}; registered: {policies()}")
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 2 or loads.shape[0] < 1 or loads.shape[1] < 1:
        raise PlacementError(f"loads must be [layers >= 1, logical experts >= 1], got shape {loads.shape}")
    if not np.isfinite(loads).all():
        raise PlacementError("loads must be finite (found NaN or inf)")
    if (loads < 0).any():
        layer, expert = np.argwhere(loads < 0)[0]
        raise PlacementError(f"loads must be >= 0; loads[{layer}, {expert}] = {loads[layer, expert]}")
    for name, value in (("num_ranks", num_ranks), ("slots_per_rank", slots_per_rank)):
        if int(value) != value or value < 1:
            raise PlacementError(f"{name} must be a positive integer, got {value!r}")
    if max_replicas is not None and (int(max_replicas) != max_replicas or max_replicas < 1):
        raise PlacementError(f"max_replicas must be a positive integer or None, got {max_replicas!r}")
    if not stay_tolerance >= 0:
        raise PlacementError(f"stay_tolerance must be >= 0, got {stay_tolerance!r}")
    num_layers, num_logical = loads.shape
    alive = alive_mask(num_ranks, alive)
    check_capacity(num_logical, num_ranks, slots_per_rank, alive)
    _check_previous(previous, num_layers, num_logical, num_ranks, slots_per_rank)
    phy2log = _POLICIES[policy](loads, num_ranks=num_ranks, slots_per_rank=slots_per_rank, alive=alive,
                                num_nodes=num_nodes, num_groups=num_groups, previous=previous,
                                max_replicas=max_replicas, stay_tolerance=stay_tolerance)
    phy2log = np.asarray(phy2log)
    if phy2log.shape != (num_layers, num_ranks * slots_per_rank):
        raise PlacementError(f"policy {policy!r} returned phy2log of shape {phy2log.shape}, expected "
                             f"{(num_layers, num_ranks * slots_per_rank)}")
    p = Placement.from_phy2log(phy2log, num_logical, num_ranks, max_replicas)
    return validate(p, alive)
