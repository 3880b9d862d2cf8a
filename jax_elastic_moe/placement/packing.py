"""The two steps of DeepSeek's EPLB, vectorised over layers: replicate experts, pack replicas.

Plus a local search (`refine_by_swaps`) that swaps replicas between the most loaded rank and
another to lower the maximum load. Shapes: L layers (one independent problem each), E logical
experts, M items to pack, P packs (ranks or nodes), S slots per pack.

The two loops (the greedy packing over items, the swap rounds) also exist in C++ (the `_loops`
module, csrc/cpu/placement.cc), used when it is built: the same steps and the same floating-point
operations in the same order, so both give the same plan (tests/test_placement.py compares them on
random shapes). The numpy code here is the reference; `impl="numpy"`, or JEM_PLACEMENT_IMPL=numpy in
the environment, runs it.
"""
from __future__ import annotations

import os

import numpy as np

from .core import PlacementError

try:
    from . import _loops as _native
except ImportError:         # a build without the extension: the numpy reference runs
    _native = None

_MOST = np.iinfo(np.int64).max
_PARTNERS = 8        # refine_by_swaps tries the heaviest pack against this many of the lightest
_UNREACHED = 4.0     # refine_by_swaps: added to the score of a swap that misses target_max (costs are <= 2)
IMPL_ENV = "JEM_PLACEMENT_IMPL"


def native_built() -> bool:
    """Whether the C++ loops (the `_loops` extension) are importable here."""
    return _native is not None


def _native_for(impl: str) -> bool:
    """impl: "auto" (C++ when built; JEM_PLACEMENT_IMPL overrides), "native" or "numpy"."""
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "auto") or "auto"
        if impl == "auto":
            return _native is not None
    if impl not in ("native", "numpy"):
        raise PlacementError(f"placement impl must be 'auto', 'native' or 'numpy', got {impl!r}")
    if impl == "native" and _native is None:
        raise PlacementError("placement impl 'native' asked for, but the placement._loops extension is not built "
                             "(reinstall the package with its C++ build, or use impl='numpy')")
    return impl == "native"


def _slot_sums(grid) -> np.ndarray:
    """[..., S] -> [...]: sums left to right over the last axis (the order the C++ loop adds in)."""
    total = grid[..., 0].copy()
    for s in range(1, grid.shape[-1]):
        total += grid[..., s]
    return total


def replicate_experts(loads, num_replicas: int, max_count: int, impl: str = "auto") -> np.ndarray:
    """How many replicas each logical expert gets.

    loads: [L, E] non-negative. Every expert gets one replica; each further replica goes to the
    expert with the largest load per replica (ties: the one with fewest replicas, then the lowest
    id, so that equal or zero loads spread evenly), never past `max_count` replicas.
    Returns logcnt [L, E] int64 whose rows sum to min(num_replicas, E * max_count).

    Computed in closed form rather than one replica at a time: giving expert e its (c+1)-th replica
    has priority loads[e] / c, which never rises with c, so the greedy order is the order of all
    (priority desc, c, e) candidates, and the K = total - E replicas it hands out are the first K of
    them: those above the K-th priority, plus the first of the ties at it in (c, e) order. The C++
    loop (impl, module docstring) hands them out one at a time from a heap, in that same order."""
    loads = np.asarray(loads, dtype=np.float64)
    num_layers, num_logical = loads.shape
    if num_replicas < num_logical:
        raise PlacementError(f"{num_replicas} replicas cannot hold {num_logical} logical experts")
    total = min(int(num_replicas), num_logical * int(max_count))
    extra = total - num_logical
    logcnt = np.ones((num_layers, num_logical), np.int64)
    if extra == 0:
        return logcnt
    if _native_for(impl):
        _native.replicate_experts(np.ascontiguousarray(loads), logcnt, extra, int(max_count))
        return logcnt
    depth = min(int(max_count) - 1, extra)                        # candidate c = 1 .. depth
    priority = (loads[:, None, :] / np.arange(1, depth + 1)[None, :, None]).reshape(num_layers, -1)
    kth = -np.partition(-priority, extra - 1, axis=1)[:, extra - 1:extra]      # [L, 1]
    above = priority > kth
    tied = priority == kth
    take = above | (tied & (np.cumsum(tied, axis=1) <= extra - above.sum(axis=1, keepdims=True)))
    return logcnt + take.reshape(num_layers, depth, num_logical).sum(axis=1)


def balanced_packing(weight, item_key, num_keys: int, pack_sizes, pack_shares=None, preferred=None,
                     tolerance: float = 0.0, present=None, initial_load=None, initial_holds=None,
                     impl: str = "auto"):
    """Packs weighted items into packs of fixed sizes so that the packs' loads are balanced.

    weight: [L, M] non-negative item weights (one packing per layer).
    item_key: [L, M] int in [-1, num_keys): items with the same key >= 0 (replicas of one expert)
        go to different packs whenever a pack with room allows it; -1 = no constraint.
    pack_sizes: [P] or [L, P] int, the items each pack takes; per layer they sum to the items present.
    pack_shares: [P] positive, the share of the load each pack should carry (default equal).
    preferred: [L, P, num_keys] bool or None, pack p held key k before. An item goes to such a pack
        when the pack's load then stays within (1 + tolerance) of its fair share, or when that pack
        is as good as the best one anyway.
    present: [L, M] bool or None (all): the items to pack; the others get pack -1.
    initial_load: [L, P] load already on each pack; initial_holds: [L, P, num_keys] bool, keys
        already in each pack (both default empty).
    Items go heaviest first, each to the pack whose load per share is lowest after taking it (ties:
    the pack with fewest items); a final pass separates replicas that greedy had to put together.
    impl: "auto", "native" or "numpy" (module docstring). Returns pack_of_item [L, M] int64."""
    weight = np.asarray(weight, dtype=np.float64)
    num_layers, num_items = weight.shape
    item_key = np.broadcast_to(np.asarray(item_key, dtype=np.int64), weight.shape)
    present = np.ones(weight.shape, bool) if present is None else np.asarray(present, bool)
    pack_sizes = np.broadcast_to(np.asarray(pack_sizes, dtype=np.int64), (num_layers, np.shape(pack_sizes)[-1]))
    num_packs = pack_sizes.shape[1]
    if (pack_sizes.sum(axis=1) != present.sum(axis=1)).any():
        raise PlacementError(f"packs of sizes {pack_sizes.sum(axis=1).tolist()} cannot take "
                             f"{present.sum(axis=1).tolist()} items")
    shares = np.ones(num_packs) if pack_shares is None else np.asarray(pack_shares, dtype=np.float64)
    shares = shares / shares.sum()
    order = np.argsort(np.where(present, -weight, np.inf), axis=1, kind="stable")
    sorted_weight = np.take_along_axis(weight, order, axis=1)
    sorted_key = np.take_along_axis(item_key, order, axis=1)
    sorted_key = np.where(sorted_key >= 0, sorted_key, num_keys)      # column num_keys: unconstrained
    sorted_present = np.take_along_axis(present, order, axis=1)
    rows = np.arange(num_layers)
    pack_load = np.zeros((num_layers, num_packs)) if initial_load is None else np.array(initial_load, float, order="C")
    pack_count = np.zeros((num_layers, num_packs), np.int64)
    holds = np.zeros((num_layers, num_keys + 1, num_packs), bool)     # [L, key, P]: a row per key
    if initial_holds is not None:
        holds[:, :num_keys, :] = np.swapaxes(initial_holds, 1, 2)
    if preferred is not None:
        preferred = np.concatenate([np.swapaxes(np.asarray(preferred, bool), 1, 2),
                                    np.zeros((num_layers, 1, num_packs), bool)], axis=1)
    fair_limit = (1.0 + tolerance) * (pack_load.sum(axis=1) + np.where(present, weight, 0).sum(axis=1))
    sorted_weight = np.where(sorted_present, sorted_weight, 0.0)
    pack_of_sorted = np.full((num_layers, num_items), -1, np.int64)
    if _native_for(impl):
        _native.pack_sorted(sorted_weight, sorted_key, np.ascontiguousarray(sorted_present),
                            np.ascontiguousarray(pack_sizes), shares, fair_limit,
                            None if preferred is None else np.ascontiguousarray(preferred), pack_load, holds,
                            pack_of_sorted, num_keys)
        return _unsort(pack_of_sorted, order, weight, item_key, num_keys, shares, initial_load, initial_holds)
    constrained = sorted_key < num_keys
    # flat views: one gather / scatter per step instead of two-array fancy indexing
    holds_rows = holds.reshape(num_layers * (num_keys + 1), num_packs)
    preferred_rows = None if preferred is None else preferred.reshape(holds_rows.shape)
    load_flat, count_flat, holds_flat = pack_load.reshape(-1), pack_count.reshape(-1), holds.reshape(-1)
    key_rows = rows[:, None] * (num_keys + 1) + sorted_key          # [L, M]: each item's row of holds
    pack_base = rows * num_packs
    for j in range(num_items):
        key_row, w, active = key_rows[:, j], sorted_weight[:, j], sorted_present[:, j]
        if not active.any():
            break
        room = pack_count < pack_sizes
        apart = room & ~holds_rows[key_row]
        candidate = np.where(apart.any(axis=1, keepdims=True), apart, room)
        level = np.where(candidate, (pack_load + w[:, None]) / shares, np.inf)
        best_level = level.min(axis=1)
        choice = np.where(level == best_level[:, None], pack_count, _MOST).argmin(axis=1)
        if preferred is not None:
            preferred_level = np.where(candidate & preferred_rows[key_row], level, np.inf)
            stay = preferred_level.argmin(axis=1)
            accept = preferred_level[rows, stay] <= np.maximum(fair_limit, best_level)
            choice = np.where(accept, stay, choice)
        pack_of_sorted[:, j] = np.where(active, choice, -1)
        at = pack_base + choice
        load_flat[at] += w
        count_flat[at] += active
        holds_flat[key_row * num_packs + choice] |= active & constrained[:, j]
    return _unsort(pack_of_sorted, order, weight, item_key, num_keys, shares, initial_load, initial_holds)


def _unsort(pack_of_sorted, order, weight, item_key, num_keys, shares, initial_load, initial_holds):
    """The packs of the sorted items back in item order, after the pass that separates replicas."""
    pack_of_item = np.empty_like(pack_of_sorted)
    np.put_along_axis(pack_of_item, order, pack_of_sorted, axis=1)
    _separate_replicas(pack_of_item, weight, item_key, num_keys, shares, initial_load, initial_holds)
    return pack_of_item


def _separate_replicas(pack_of_item, weight, item_key, num_keys, shares, initial_load, initial_holds):
    """Where greedy packing had to put two items of one key into one pack, swaps one of them with an
    item of another pack that breaks no other such rule, choosing the swap that keeps the two packs'
    loads lowest. In place; pack_of_item [L, M] (-1 = not packed), weight, item_key [L, M]."""
    num_packs = len(shares)
    key_column = np.where(item_key >= 0, item_key, num_keys)
    for layer in range(pack_of_item.shape[0]):
        packed = np.nonzero(pack_of_item[layer] >= 0)[0]
        packs, keys, w = pack_of_item[layer, packed], key_column[layer, packed], weight[layer, packed]
        held = np.zeros((num_packs, num_keys + 1), np.int64)
        if initial_holds is not None:
            held[:, :num_keys] = initial_holds[layer]
        np.add.at(held, (packs, keys), 1)
        held[:, num_keys] = 0
        if held.max(initial=0) <= 1:
            continue
        load = np.bincount(packs, weights=w, minlength=num_packs)
        if initial_load is not None:
            load += initial_load[layer]
        for _ in range(len(packed)):
            crowded = [(p, k) for p, k in np.argwhere(held > 1) if ((packs == p) & (keys == k)).any()]
            swap = None
            for pack, key in crowded:
                item = np.nonzero((packs == pack) & (keys == key))[0][0]
                allowed = ((packs != pack) & (held[packs, key] == 0) & (keys != key)
                           & ((keys == num_keys) | (held[pack, keys] == 0)))
                if allowed.any():
                    new_here = (load[pack] - w[item] + w) / shares[pack]
                    new_there = (load[packs] - w + w[item]) / shares[packs]
                    other = int(np.argmin(np.where(allowed, np.maximum(new_here, new_there), np.inf)))
                    swap = item, other
                    break
            if swap is None:
                break
            item, other = swap
            here, there = packs[item], packs[other]
            for pack, sign in ((here, -1), (there, 1)):
                held[pack, keys[item]] += sign
                held[pack, keys[other]] -= sign
                load[pack] += sign * (w[item] - w[other])
            held[:, num_keys] = 0
            packs[item], packs[other] = there, here
        pack_of_item[layer, packed] = packs


def refine_by_swaps(grid_expert, grid_weight, target_max=None, move_cost=None, max_rounds: int = 64,
                    impl: str = "auto") -> np.ndarray:
    """Lowers the most loaded pack's load by swapping one of its items with an item (or empty slot)
    of one of the lightest packs, the swap that leaves the two packs' larger load lowest, as long
    as one helps.

    grid_expert: [L, P, S] int, expert held by each slot (-1 = empty); grid_weight: [L, P, S] its
    load. Both are changed in place; no swap adds replicas of one expert sharing a pack.
    target_max: [L] or None: stop a layer once its largest pack load is at most this.
    move_cost: [L, P, S] or None: what moving each slot's current expert costs (1 for an expert
        that would otherwise stay, 0 for one being loaded anyway); swaps then reach target_max as
        cheaply as they can: of the swaps that bring the two packs to at most target_max, the
        cheapest; when none does, the one that lowers the pair's load most. Updated in place.
    Ties go to the first candidate in (partner, heavy pack's slot, partner's slot) order, partners
    taken lightest first (by load, then index). impl: "auto", "native" or "numpy" (module docstring).
    Returns [L] int64, the swaps made per layer (each moves at most two expert weights)."""
    num_layers, num_packs, num_slots = grid_expert.shape
    if num_packs == 0 or num_slots == 0:
        return np.zeros(num_layers, np.int64)
    if target_max is not None:
        target_max = np.array(np.broadcast_to(np.asarray(target_max, np.float64), (num_layers,)))   # a copy
    if _native_for(impl):
        swaps = np.zeros(num_layers, np.int64)
        arrays = [np.ascontiguousarray(grid_expert, np.int64), np.ascontiguousarray(grid_weight, np.float64),
                  None if move_cost is None else np.ascontiguousarray(move_cost, np.float64)]
        _native.refine_by_swaps(arrays[0], arrays[1], target_max, arrays[2], swaps, _PARTNERS, max_rounds)
        for given, done in zip((grid_expert, grid_weight, move_cost), arrays):
            if done is not None and done is not given:      # a copy was worked on: write it back
                given[...] = done
        return swaps
    rows = np.arange(num_layers)
    swaps = np.zeros(num_layers, np.int64)
    active = np.ones(num_layers, bool)
    for _ in range(max_rounds):
        load = _slot_sums(grid_weight)                                   # [L, P]
        heavy = load.argmax(axis=1)
        heavy_load = load[rows, heavy]
        if target_max is not None:
            active &= heavy_load > target_max
        if not active.any():
            break
        rows_a = rows[active]
        # partners: the lightest packs, lightest first (all of them, in index order, when there are few)
        partner = (np.argsort(load[active], axis=1, kind="stable")[:, :_PARTNERS]
                   if num_packs > _PARTNERS else np.broadcast_to(np.arange(num_packs), (len(rows_a), num_packs)))
        h_expert, h_weight = grid_expert[rows_a, heavy[active]], grid_weight[rows_a, heavy[active]]  # [A, S]
        g_expert = grid_expert[rows_a[:, None], partner]                                             # [A, K, S]
        g_weight = grid_weight[rows_a[:, None], partner]
        top = heavy_load[active, None, None, None]
        delta = h_weight[:, None, :, None] - g_weight[:, :, None, :]                                 # [A, K, Si, Sj]
        pair_max = top - delta                        # (in place below: these arrays are the round's cost)
        np.maximum(pair_max, np.take_along_axis(load[active], partner, axis=1)[:, :, None, None] + delta,
                   out=pair_max)
        # a swap may not add replicas of one expert sharing a pack: count those it adds and removes
        # (empty slots, -1, count as nothing)
        h_named = np.where(h_expert >= 0, h_expert, -2)             # an empty slot (-1) matches nothing
        same_hg = h_named[:, None, :, None] == g_expert[:, :, None, :]
        h_dup_i = ((h_expert[:, :, None] == h_expert[:, None, :]).sum(axis=2) >= 2) & (h_expert >= 0)   # [A, Si]
        g_dup_j = ((g_expert[:, :, :, None] == g_expert[:, :, None, :]).sum(axis=3) >= 2) & (g_expert >= 0)
        # added <= removed, split by slot: (g has i) - (i duplicated on h) + (h has j) - (j duplicated on g)
        net_i = same_hg.any(axis=3).astype(np.int8) - h_dup_i[:, None, :]                  # [A, K, Si]
        net_j = same_hg.any(axis=2).astype(np.int8) - g_dup_j                                # [A, K, Sj]
        # pair_max below heavy_load implies delta > 0 (heavy_load > 0 wherever a swap can help)
        barred = net_i[:, :, :, None] + net_j[:, :, None, :] > 0                   # the swaps that do not help
        barred |= (partner == heavy[active, None])[:, :, None, None]
        barred |= pair_max >= top * (1 - 1e-12)
        score = pair_max / top                                                  # in (0, 1) where it helps
        if move_cost is not None and target_max is not None:
            cost = (move_cost[rows_a, heavy[active]][:, None, :, None]
                    + move_cost[rows_a[:, None], partner][:, :, None, :])
            # cost + score where the pair reaches the target, else after every swap that does
            score += np.where(pair_max <= target_max[active, None, None, None], cost, _UNREACHED)
        np.copyto(score, np.inf, where=barred)
        gain = score.reshape(len(rows_a), -1)
        best = gain.argmin(axis=1)
        ok = np.isfinite(gain[np.arange(len(rows_a)), best])
        if not ok.any():
            break
        layer = rows_a[ok]
        column, slot_h, slot_g = np.unravel_index(best[ok], partner.shape[1:] + h_weight.shape[1:] * 2)
        pack = partner[ok, column]
        h = heavy[layer]
        for grid in (grid_expert, grid_weight):
            held_h = grid[layer, h, slot_h].copy()
            grid[layer, h, slot_h] = grid[layer, pack, slot_g]
            grid[layer, pack, slot_g] = held_h
        if move_cost is not None:                  # both experts now move: moving them again is free
            move_cost[layer, h, slot_h] = 0
            move_cost[layer, pack, slot_g] = 0
        swaps[layer] += 1
        active[rows_a[~ok]] = False
    return swaps
