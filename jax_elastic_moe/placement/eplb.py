"""DeepSeek's expert-parallel load balancer (EPLB) over the alive ranks, vectorised over layers.

The algorithm (after deepseek-ai/EPLB): give every logical expert one replica, then keep giving one
more to the expert with the largest load per replica until the slots are full; pack the replicas
onto ranks, heaviest first, each onto the least loaded rank with a free slot. The hierarchical
variant first packs groups of experts onto nodes (a token's experts then sit on few nodes), then
replicates and packs inside each node.

Added here for elastic serving:
- dead ranks take no replicas; their slots stay empty and the global slot numbering is kept;
- at most one replica of an expert per rank (when the shape allows), so that one rank failure
  costs an expert one replica, never all of them while it has more;
- a swap pass after packing that lowers the most loaded rank further, and a second candidate with
  even replica counts, kept per layer when it packs better (small shapes);
- when every rank can hold every expert (E <= S), every rank gets the same multiset: exact balance;
- `stay_plan`: the survivors keep what they hold, surplus replicas leave the most loaded ranks,
  missing replicas are packed into the free slots, and swaps run only until the balance is within
  a tolerance of the fresh plan's; few expert weights move.

Shapes: L layers, E logical experts, N ranks, S slots per rank, a alive ranks of one node.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .core import PlacementError, rank_loads, replica_counts
from .packing import balanced_packing, refine_by_swaps, replicate_experts

# A fresh plan stops swapping once its most loaded rank is within 0.1% of the mean.
REFINE_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """Which alive ranks form each node and how many expert groups each node takes."""
    node_ranks: list          # per node: [a] int64, its alive global ranks
    groups_per_node: np.ndarray   # [nodes] int64
    num_groups: int
    group_size: int


def node_layout(num_logical: int, num_ranks: int, slots_per_rank: int, alive, num_nodes: int,
                num_groups: int) -> NodeLayout:
    """Splits the alive ranks into nodes (rank r is on node r // (num_ranks // num_nodes)) and gives
    each node expert groups in proportion to its alive slots. When groups cannot stay whole on the
    nodes (too little room on some, or more nodes with alive ranks than groups), one node spans
    all alive ranks and one group all experts: the global policy."""
    alive_ranks = np.nonzero(np.asarray(alive, bool))[0]
    ranks_per_node = num_ranks // num_nodes
    node_ranks = [alive_ranks[alive_ranks // ranks_per_node == node] for node in range(num_nodes)]
    node_ranks = [ranks for ranks in node_ranks if len(ranks)]                # nodes with a live rank
    group_size = num_logical // num_groups
    node_slots = np.array([len(r) * slots_per_rank for r in node_ranks], np.int64)
    room = node_slots // group_size
    if len(node_ranks) == 1 or room.sum() < num_groups or len(node_ranks) > num_groups:
        return NodeLayout([alive_ranks], np.array([1]), 1, num_logical)
    ideal = num_groups * node_slots / node_slots.sum()
    count = np.minimum(np.floor(ideal).astype(np.int64), room)
    while count.sum() < num_groups:
        count[int(np.argmax(np.where(count < room, ideal - count, -np.inf)))] += 1
    return NodeLayout(node_ranks, count, num_groups, group_size)


def held_by_rank(phy2log, num_ranks: int, slots_per_rank: int, num_logical: int) -> np.ndarray:
    """phy2log [L, N * S] -> [L, N, E] bool: rank r holds a replica of expert e."""
    phy2log = np.asarray(phy2log)
    num_layers = phy2log.shape[0]
    held = np.zeros((num_layers, num_ranks, num_logical + 1), bool)
    rank = np.arange(phy2log.shape[1]) // slots_per_rank
    held[np.arange(num_layers)[:, None], rank[None, :], np.where(phy2log >= 0, phy2log, num_logical)] = True
    return held[:, :, :num_logical]


def _experts_by_node(loads, layout: NodeLayout, held_before=None, tolerance: float = 0.0):
    """Packs expert groups onto nodes (towards where they were, with held_before [L, N, E]).
    Returns per node [L, m] int64, the logical experts it serves in each layer."""
    num_layers, num_logical = loads.shape
    num_groups, group_size = layout.num_groups, layout.group_size
    if len(layout.node_ranks) > 1:
        group_loads = loads.reshape(num_layers, num_groups, group_size).sum(axis=2)
        preferred = None
        if held_before is not None:
            preferred = np.stack([held_before[:, ranks, :].any(axis=1)
                                  .reshape(num_layers, num_groups, group_size).any(axis=2)
                                  for ranks in layout.node_ranks], axis=1)
        node_of_group = balanced_packing(group_loads, np.arange(num_groups), num_groups,
                                         layout.groups_per_node, [len(r) for r in layout.node_ranks],
                                         preferred, tolerance)
    else:
        node_of_group = np.zeros((num_layers, num_groups), np.int64)
    groups_by_node = np.argsort(node_of_group, axis=1, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(layout.groups_per_node)])
    return [(groups_by_node[:, lo:hi, None] * group_size + np.arange(group_size)).reshape(num_layers, -1)
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def _replica_cap(num_experts: int, num_ranks_here: int, slots_per_rank: int, max_replicas) -> int:
    """At most one replica per rank, unless there are too few experts to fill the slots that way;
    never past max_replicas."""
    num_slots = num_ranks_here * slots_per_rank
    cap = num_ranks_here if num_experts * num_ranks_here >= num_slots else -(-num_slots // num_experts)
    return cap if max_replicas is None else min(cap, int(max_replicas))


def _identical_ranks(num_experts: int, num_ranks_here: int, slots_per_rank: int, max_replicas) -> bool:
    """Whether every rank can hold the same multiset of experts, each expert at least once, filling
    its slots within max_replicas: then every rank carries exactly 1 / a of the load."""
    return num_experts <= slots_per_rank and (
        max_replicas is None or (int(max_replicas) // num_ranks_here) * num_experts >= slots_per_rank)


def _replica_budget(num_experts: int, num_ranks_here: int, slots_per_rank: int, max_replicas):
    """(per rank, replicas, cap) of node_replica_counts: EPLB hands out `replicas` (each expert at most
    `cap`) over the node's slots, or, when every rank can hold every expert, over one rank's slots,
    copied on every rank (per_rank)."""
    if _identical_ranks(num_experts, num_ranks_here, slots_per_rank, max_replicas):
        cap = slots_per_rank if max_replicas is None else int(max_replicas) // num_ranks_here
        return True, slots_per_rank, cap
    return False, num_ranks_here * slots_per_rank, _replica_cap(num_experts, num_ranks_here, slots_per_rank,
                                                                max_replicas)


def node_replica_counts(node_loads, num_ranks_here: int, slots_per_rank: int, max_replicas) -> np.ndarray:
    """node_loads [L, m] -> logcnt [L, m]: EPLB's replica counts for one node's slots. When each
    rank can hold every expert (m <= S), a rank's share is replicated on every rank instead, so
    counts are multiples of the node's ranks."""
    per_rank, replicas, cap = _replica_budget(node_loads.shape[1], num_ranks_here, slots_per_rank, max_replicas)
    return replicate_experts(node_loads, replicas, cap) * (num_ranks_here if per_rank else 1)


def node_replica_total(num_experts: int, num_ranks_here: int, slots_per_rank: int, max_replicas) -> int:
    """What every row of node_replica_counts sums to, without computing it."""
    per_rank, replicas, cap = _replica_budget(num_experts, num_ranks_here, slots_per_rank, max_replicas)
    return min(replicas, num_experts * cap) * (num_ranks_here if per_rank else 1)


def even_counts(loads, num_replicas: int, max_count: int) -> np.ndarray:
    """loads [L, E] -> logcnt [L, E] int64: the replicas shared out evenly (what round-robin
    gives), the extra ones to the most loaded experts. Rows sum to min(num_replicas, E * max_count)."""
    num_layers, num_logical = np.shape(loads)
    base, extra = divmod(min(int(num_replicas), num_logical * int(max_count)), num_logical)
    heaviest_first = np.argsort(-np.asarray(loads), axis=1, kind="stable")
    logcnt = np.full((num_layers, num_logical), base, np.int64)
    np.put_along_axis(logcnt, heaviest_first[:, :extra], base + 1, axis=1)
    return logcnt


def _pack_counts(node_loads, experts, logcnt, num_ranks_here: int, slots_per_rank: int, num_logical: int):
    """Packs logcnt [L, m] replicas of the experts [L, m] (loads node_loads [L, m]) onto the node's
    ranks, then swaps. Returns grids (expert [L, a, S], -1 = empty; weight [L, a, S])."""
    num_layers, num_experts = experts.shape
    local = np.repeat(np.tile(np.arange(num_experts), num_layers), logcnt.ravel()).reshape(num_layers, -1)
    empty = num_ranks_here * slots_per_rank - local.shape[1]
    item_expert = np.pad(np.take_along_axis(experts, local, axis=1), ((0, 0), (0, empty)), constant_values=-1)
    item_weight = np.pad(np.take_along_axis(node_loads / logcnt, local, axis=1), ((0, 0), (0, empty)))
    pack = balanced_packing(item_weight, item_expert, num_logical, np.full(num_ranks_here, slots_per_rank))
    order = np.argsort(pack, axis=1, kind="stable")
    grid_expert = np.take_along_axis(item_expert, order, axis=1).reshape(num_layers, num_ranks_here, -1)
    grid_weight = np.take_along_axis(item_weight, order, axis=1).reshape(grid_expert.shape)
    mean_load = grid_weight.sum(axis=(1, 2)) / num_ranks_here
    refine_by_swaps(grid_expert, grid_weight, target_max=mean_load * (1.0 + REFINE_TOLERANCE))
    return grid_expert, grid_weight


def _fresh_node(loads, experts, ranks, slots_per_rank, num_logical, max_replicas, held_before):
    """Replicates a node's experts [L, m] over its alive ranks [a] and packs them; with held_before
    [L, N, E], renumbers the ranks towards it. Returns (item_rank, item_expert), both [L, a * S].

    Two replica counts are packed: EPLB's (most load per replica first) and even counts; per
    layer the better balanced plan is kept. EPLB's wins on large shapes; with few slots per rank
    its lumpy splits (the hottest expert on every rank) can pack worse than even counts."""
    num_layers, num_experts = experts.shape
    node_loads = np.take_along_axis(loads, experts, axis=1)
    slots = len(ranks) * slots_per_rank
    cap = _replica_cap(num_experts, len(ranks), slots_per_rank, max_replicas)
    eplb_counts = node_replica_counts(node_loads, len(ranks), slots_per_rank, max_replicas)
    if _identical_ranks(num_experts, len(ranks), slots_per_rank, max_replicas):
        per_rank = eplb_counts // len(ranks)
        local = np.repeat(np.tile(np.arange(num_experts), num_layers), per_rank.ravel()).reshape(num_layers, -1)
        one_rank = np.pad(np.take_along_axis(experts, local, axis=1),
                          ((0, 0), (0, slots_per_rank - local.shape[1])), constant_values=-1)
        grid_expert = np.broadcast_to(one_rank[:, None, :], (num_layers, len(ranks), slots_per_rank))
        return _to_ranks(grid_expert, ranks, num_logical, held_before)
    grid_expert, grid_weight = _pack_counts(node_loads, experts, eplb_counts, len(ranks), slots_per_rank, num_logical)
    spread = even_counts(node_loads, slots, cap)
    # even counts are tried only where EPLB's packing stayed above the swaps' target (within
    # REFINE_TOLERANCE of the mean, the lower bound): elsewhere they could gain less than that
    rank_load = grid_weight.sum(axis=2)
    top = rank_load.max(axis=1)
    retry = np.nonzero((top > rank_load.sum(axis=1) / len(ranks) * (1.0 + REFINE_TOLERANCE))
                       & (spread != eplb_counts).any(axis=1))[0]
    if len(retry):
        other_expert, other_weight = _pack_counts(node_loads[retry], experts[retry], spread[retry], len(ranks),
                                                  slots_per_rank, num_logical)
        better = other_weight.sum(axis=2).max(axis=1) < top[retry]
        grid_expert[retry[better]] = other_expert[better]
    return _to_ranks(grid_expert, ranks, num_logical, held_before)


def _to_ranks(grid_expert, ranks, num_logical, held_before):
    """grid_expert [L, a, S] (row p = the node's p-th alive rank) -> (item_rank, item_expert), both
    [L, a * S]; with held_before [L, N, E], the rows are renumbered towards where experts were."""
    num_layers, num_ranks_here, slots_per_rank = grid_expert.shape
    pack = np.broadcast_to(np.repeat(np.arange(num_ranks_here), slots_per_rank), (num_layers, grid_expert[0].size))
    item_expert = grid_expert.reshape(num_layers, -1)
    if held_before is not None:
        pack = relabel_packs(pack, item_expert, num_logical, held_before[:, ranks, :])
    return ranks[pack], item_expert


def fresh_plan(loads, num_ranks: int, slots_per_rank: int, alive, num_nodes: int = 1, num_groups: int = 1,
               max_replicas: int | None = None, previous=None) -> np.ndarray:
    """EPLB from scratch over the alive ranks: groups to nodes, replicas within nodes, packing to
    ranks, then swaps. loads [L, E]; alive [N] bool; num_groups divides E and num_nodes divides N
    (the caller checks). previous: [L, N * S] phy2log or None: ranks are renumbered within each node
    and slots ordered to keep as many experts in place as the plan allows (same balance).
    Returns phy2log [L, N * S] int32, dead ranks' slots empty."""
    loads = np.asarray(loads, dtype=np.float64)
    num_logical = loads.shape[1]
    layout = node_layout(num_logical, num_ranks, slots_per_rank, alive, num_nodes, num_groups)
    held_before = None if previous is None else held_by_rank(previous, num_ranks, slots_per_rank, num_logical)
    parts = [_fresh_node(loads, experts, ranks, slots_per_rank, num_logical, max_replicas, held_before)
             for experts, ranks in zip(_experts_by_node(loads, layout), layout.node_ranks) if experts.shape[1]]
    return place_in_slots(np.concatenate([r for r, _ in parts], axis=1),
                          np.concatenate([e for _, e in parts], axis=1),
                          num_ranks, slots_per_rank, num_logical, previous)


def _stay_node(loads, experts, ranks, slots_per_rank, num_logical, max_replicas, previous, target_max,
               fresh_counts):
    """A node's plan that keeps what its alive ranks [a] held in `previous` [L, N * S] as far as the
    replica counts of its experts [L, m] allow: the fresh plan's, fresh_counts [L, E], in the layers
    where they fill this node's slots, else EPLB's. Returns (item_rank, item_expert), [L, a * S]."""
    num_layers, num_experts = experts.shape
    rows = np.arange(num_layers)[:, None]
    node_loads = np.take_along_axis(loads, experts, axis=1)
    fresh = np.take_along_axis(fresh_counts, experts, axis=1)
    fits = ((fresh.sum(axis=1) == node_replica_total(num_experts, len(ranks), slots_per_rank, max_replicas))
            & (fresh >= 1).all(axis=1))
    target = np.zeros((num_layers, num_logical + 1), np.int64)     # column E: empty slots, no target
    if (fits & (fresh.max(axis=1) <= len(ranks))).all():           # the common case: no own counts needed
        target[rows, experts] = fresh
    else:
        own = node_replica_counts(node_loads, len(ranks), slots_per_rank, max_replicas)
        fits &= fresh.max(axis=1) <= max(own.max(initial=1), len(ranks))
        target[rows, experts] = np.where(fits[:, None], fresh, own)
    per_replica = np.where(target > 0, np.append(loads, np.zeros((num_layers, 1)), axis=1) / np.maximum(target, 1), 0.0)
    slots = (ranks[:, None] * slots_per_rank + np.arange(slots_per_rank)).ravel()
    grid = np.asarray(previous)[:, slots].reshape(num_layers, len(ranks), slots_per_rank).astype(np.int64)
    grid = np.where(grid >= 0, grid, num_logical)
    grid = np.where(target[rows[:, :, None], grid] > 0, grid, num_logical)     # experts now elsewhere
    # surplus replicas (and second replicas on one rank) leave, most loaded ranks first
    rank_load = per_replica[rows[:, :, None], grid].sum(axis=2)
    layer_i, rank_i, slot_i = np.nonzero(grid < num_logical)
    expert_i = grid[layer_i, rank_i, slot_i]
    order = np.lexsort((-rank_load[layer_i, rank_i], rank_i, expert_i, layer_i))
    same_rank = np.zeros(len(order), bool)
    same_rank[1:] = ((layer_i[order][1:] == layer_i[order][:-1]) & (expert_i[order][1:] == expert_i[order][:-1])
                     & (rank_i[order][1:] == rank_i[order][:-1]))
    grid[layer_i[order][same_rank], rank_i[order][same_rank], slot_i[order][same_rank]] = num_logical
    layer_i, rank_i, slot_i = np.nonzero(grid < num_logical)
    expert_i = grid[layer_i, rank_i, slot_i]
    order = np.lexsort((-rank_load[layer_i, rank_i], expert_i, layer_i))
    nth = _occurrence(layer_i[order] * (num_logical + 1) + expert_i[order])
    width_e = num_logical + 1
    held = np.bincount(layer_i * width_e + expert_i, minlength=num_layers * width_e).reshape(num_layers, width_e)
    surplus = np.maximum(held - target, 0)
    leave = nth < surplus[layer_i[order], expert_i[order]]
    grid[layer_i[order][leave], rank_i[order][leave], slot_i[order][leave]] = num_logical
    # missing replicas into the free slots, heaviest first onto the least loaded rank
    held = np.bincount((rows * width_e + grid.reshape(num_layers, -1)).ravel(),
                       minlength=num_layers * width_e).reshape(num_layers, width_e)
    missing = np.maximum(target - held, 0)[:, :num_logical]
    free = (grid == num_logical).sum(axis=2)                                  # [L, a]
    width = int(free.sum(axis=1).max(initial=0))
    item_expert = np.full((num_layers, width), -1, np.int64)
    present = np.arange(width)[None, :] < free.sum(axis=1)[:, None]
    for layer in range(num_layers):
        new = np.repeat(np.arange(num_logical), missing[layer])
        item_expert[layer, :len(new)] = new
    item_weight = np.where(item_expert >= 0, np.take_along_axis(per_replica, np.maximum(item_expert, 0), 1), 0.0)
    holds = np.zeros((num_layers, len(ranks), num_logical + 1), bool)
    holds[rows[:, :, None], np.arange(len(ranks))[None, :, None], grid] = True
    pack = balanced_packing(item_weight, item_expert, num_logical, free, present=present,
                            initial_load=per_replica[rows[:, :, None], grid].sum(axis=2),
                            initial_holds=holds[:, :, :num_logical])
    # fill each rank's free slots with its new items, in slot order
    move_cost = (grid < num_logical).astype(np.float64)
    layer_f, rank_f, slot_f = np.nonzero(grid == num_logical)
    layer_n, col_n = np.nonzero(present)
    by_rank = np.lexsort((pack[layer_n, col_n], layer_n))
    grid[layer_f, rank_f, slot_f] = np.where(item_expert[layer_n, col_n][by_rank] >= 0,
                                             item_expert[layer_n, col_n][by_rank], num_logical)
    grid_weight = per_replica[rows[:, :, None], grid]
    grid = np.where(grid < num_logical, grid, -1)
    refine_by_swaps(grid, grid_weight, target_max, move_cost)
    return np.broadcast_to(np.repeat(ranks, slots_per_rank), (num_layers, grid[0].size)), grid.reshape(num_layers, -1)


def stay_plan(loads, num_ranks: int, slots_per_rank: int, alive, previous, fresh, num_nodes: int = 1,
              num_groups: int = 1, max_replicas: int | None = None, tolerance: float = 0.0) -> np.ndarray:
    """The fresh plan's replica counts, placed by changing `previous` [L, N * S] as little as it can:
    survivors keep their experts, surplus replicas leave the most loaded ranks, missing ones go to
    the least loaded free slots, then swaps run until each layer's largest rank load is within
    (1 + tolerance) of the fresh plan's (or no swap helps). Groups stay on their node unless that
    costs more than `tolerance` of balance. fresh: [L, N * S], fresh_plan's result for the same
    arguments. Same arguments as fresh_plan otherwise. Returns phy2log [L, N * S] int32."""
    loads = np.asarray(loads, dtype=np.float64)
    num_logical = loads.shape[1]
    target_max = rank_loads(fresh, loads, slots_per_rank).max(axis=1) * (1.0 + tolerance)
    fresh_counts = replica_counts(fresh, num_logical)
    layout = node_layout(num_logical, num_ranks, slots_per_rank, alive, num_nodes, num_groups)
    held_before = held_by_rank(previous, num_ranks, slots_per_rank, num_logical)
    parts = [_stay_node(loads, experts, ranks, slots_per_rank, num_logical, max_replicas, previous, target_max,
                        fresh_counts)
             for experts, ranks in zip(_experts_by_node(loads, layout, held_before, tolerance), layout.node_ranks)
             if experts.shape[1]]
    return place_in_slots(np.concatenate([r for r, _ in parts], axis=1),
                          np.concatenate([e for _, e in parts], axis=1),
                          num_ranks, slots_per_rank, num_logical, previous)


def relabel_packs(pack_of_item, item_key, num_keys: int, held_before) -> np.ndarray:
    """Renumbers the packs of each layer so that pack p goes where the keys it holds were before.

    pack_of_item: [L, M] int in [0, P); item_key: [L, M] int in [-1, num_keys);
    held_before: [L, P, num_keys] bool, position q held key k before.
    Packs are interchangeable (same size and share), so this costs no balance. Greedy matching on
    the number of shared keys. Returns [L, M], the new position of each item's pack."""
    num_layers, num_packs = held_before.shape[:2]
    rows = np.repeat(np.arange(num_layers), np.shape(pack_of_item)[1])
    keys = np.asarray(item_key).ravel()
    holds = np.zeros((num_layers, num_packs, num_keys + 1), np.float32)
    holds[rows, np.asarray(pack_of_item).ravel(), np.where(keys >= 0, keys, num_keys)] = 1.0
    overlap = np.einsum("lpk,lqk->lpq", holds[:, :, :num_keys], held_before.astype(np.float32))
    position = np.empty((num_layers, num_packs), np.int64)
    layers = np.arange(num_layers)
    for _ in range(num_packs):
        flat = overlap.reshape(num_layers, -1).argmax(axis=1)
        pack, where = flat // num_packs, flat % num_packs
        position[layers, pack] = where
        overlap[layers, pack, :] = -1.0
        overlap[layers, :, where] = -1.0
    return np.take_along_axis(position, np.asarray(pack_of_item), axis=1)


def _occurrence(sorted_keys) -> np.ndarray:
    """[K] sorted -> [K] int64: how many equal keys come before each one."""
    index = np.arange(len(sorted_keys))
    starts = np.ones(len(sorted_keys), bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return index - np.maximum.accumulate(np.where(starts, index, 0))


def place_in_slots(item_rank, item_expert, num_ranks: int, slots_per_rank: int, num_logical: int,
                   previous=None) -> np.ndarray:
    """Puts each rank's items into its slots, keeping an expert in the slot that held it before.

    item_rank: [L, M] int, the rank of each item; each rank named gets exactly slots_per_rank items
    per layer, ranks not named keep empty slots. item_expert: [L, M] int, -1 = leave a slot empty.
    previous: [L, N * S] phy2log or None. An item whose expert the same rank held before takes that
    slot; the other items fill the rank's remaining slots in slot order. Returns phy2log [L, N * S]."""
    item_rank = np.asarray(item_rank, dtype=np.int64)
    item_expert = np.asarray(item_expert, dtype=np.int64)
    num_layers, num_items = item_rank.shape
    slots = num_ranks * slots_per_rank
    layer = np.repeat(np.arange(num_layers, dtype=np.int64), num_items)
    per_rank = np.bincount(layer * num_ranks + item_rank.ravel(), minlength=num_layers * num_ranks)
    if ((per_rank != 0) & (per_rank != slots_per_rank)).any():
        raise PlacementError("internal: a rank received a number of items other than slots_per_rank")
    expert = item_expert.ravel()
    group = (layer * num_ranks + item_rank.ravel()) * (num_logical + 1) + np.where(expert >= 0, expert, num_logical)
    order = np.argsort(group, kind="stable")
    slot_of_item = np.full(num_layers * num_items, -1, np.int64)
    taken = np.zeros(num_layers * slots, bool)
    if previous is not None:
        held = np.asarray(previous, dtype=np.int64).ravel()
        slot_id = np.tile(np.arange(slots, dtype=np.int64), num_layers)
        slot_group = ((np.repeat(np.arange(num_layers, dtype=np.int64), slots) * num_ranks
                       + slot_id // slots_per_rank) * (num_logical + 1) + np.where(held >= 0, held, num_logical))
        slot_order = np.argsort(slot_group, kind="stable")
        # the j-th item of a (layer, rank, expert) takes the j-th slot that held it
        item_match = group[order] * slots_per_rank + _occurrence(group[order])
        slot_match = slot_group[slot_order] * slots_per_rank + _occurrence(slot_group[slot_order])
        _, item_at, slot_at = np.intersect1d(item_match, slot_match, assume_unique=True, return_indices=True)
        slot_of_item[order[item_at]] = slot_id[slot_order[slot_at]]
        taken[slot_order[slot_at]] = True
    # the rest, in (layer, rank, expert) order, into the free slots of their rank in slot order
    rest = order[slot_of_item[order] < 0]
    free = np.nonzero(np.repeat(per_rank > 0, slots_per_rank) & ~taken)[0]
    slot_of_item[rest] = free % slots
    phy2log = np.full((num_layers, slots), -1, np.int32)
    phy2log[layer, slot_of_item] = expert
    return phy2log
