"""Placement policies, invariants, elasticity, minimal movement (hypothesis + DeepSeek-V3 cases)."""
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_elastic_moe import placement as pl
from jax_elastic_moe.placement import Placement, PlacementError, movement, rebalance, validate
from jax_elastic_moe.placement import packing
from jax_elastic_moe.placement.packing import balanced_packing, refine_by_swaps, replicate_experts
from jax_elastic_moe.placement.planner import zipf_loads

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True)
DEEPSEEK = ("deepseek_global", "deepseek_hierarchical")


def make_loads(kind: str, num_layers: int, num_logical: int, seed: int) -> np.ndarray:
    """[L, E] loads of a given kind: zeros, uniform, zipf (skewed), random, one_hot, integers."""
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return np.zeros((num_layers, num_logical))
    if kind == "uniform":
        return np.full((num_layers, num_logical), 7.0)
    if kind == "zipf":
        return zipf_loads(num_layers, num_logical, 1.0 + rng.random(), seed=seed)
    if kind == "one_hot":
        loads = np.zeros((num_layers, num_logical))
        loads[np.arange(num_layers), rng.integers(0, num_logical, num_layers)] = 1000.0
        return loads
    if kind == "integers":
        return rng.integers(0, 5, (num_layers, num_logical)).astype(float)
    return rng.random((num_layers, num_logical)) * 100


@st.composite
def cases(draw, min_layers=1, max_layers=3, kinds=("zeros", "uniform", "zipf", "random", "one_hot", "integers")):
    """A random shape, alive mask (>= 1 alive), load and max_replicas that leave room for every expert."""
    num_ranks = draw(st.integers(1, 8))
    slots_per_rank = draw(st.integers(1, 6))
    alive = np.array(draw(st.lists(st.booleans(), min_size=num_ranks, max_size=num_ranks)))
    if not alive.any():
        alive[draw(st.integers(0, num_ranks - 1))] = True
    num_logical = draw(st.integers(1, int(alive.sum()) * slots_per_rank))
    num_layers = draw(st.integers(min_layers, max_layers))
    loads = make_loads(draw(st.sampled_from(kinds)), num_layers, num_logical, draw(st.integers(0, 2**16)))
    max_replicas = draw(st.none() | st.integers(1, 4))
    return dict(loads=loads, num_ranks=num_ranks, slots_per_rank=slots_per_rank, alive=alive,
                max_replicas=max_replicas)


def hierarchy(case, draw_nodes: int, draw_groups: int):
    """Valid num_nodes / num_groups for a case: the draw-th divisors of N and E."""
    num_logical = case["loads"].shape[1]
    nodes = [d for d in range(1, case["num_ranks"] + 1) if case["num_ranks"] % d == 0]
    groups = [d for d in range(1, num_logical + 1) if num_logical % d == 0]
    return nodes[draw_nodes % len(nodes)], groups[draw_groups % len(groups)]


def check_placement(p: Placement, case):
    """Every invariant, computed independently of the library's validate()."""
    num_layers, num_logical = case["loads"].shape
    num_ranks, slots_per_rank, alive = case["num_ranks"], case["slots_per_rank"], case["alive"]
    assert p.phy2log.shape == (num_layers, num_ranks * slots_per_rank)
    dead_slots = ~np.repeat(alive, slots_per_rank)
    assert (p.phy2log[:, dead_slots] == -1).all(), "an expert sits on a dead rank"
    for layer in range(num_layers):
        for expert in range(num_logical):
            slots = np.nonzero(p.phy2log[layer] == expert)[0]
            assert len(slots) >= 1, f"expert {expert} of layer {layer} has no replica"
            assert p.logcnt[layer, expert] == len(slots)
            row = p.log2phy[layer, expert]
            assert row[:len(slots)].tolist() == slots.tolist() and (row[len(slots):] == -1).all()
    if case["max_replicas"] is not None:
        assert p.max_replicas == case["max_replicas"] and p.logcnt.max() <= case["max_replicas"]


def rank_has_duplicate(p: Placement, ranks) -> bool:
    held = p.phy2log.reshape(p.num_layers, p.num_ranks, p.slots_per_rank)[:, ranks]
    ordered = np.sort(held, axis=-1)
    return bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any())


# ----- properties -----

@PROPERTY
@given(case=cases(), policy=st.sampled_from(["round_robin", *DEEPSEEK]), nodes=st.integers(0, 7),
       groups=st.integers(0, 7))
def test_every_policy_keeps_invariants_and_only_uses_alive_ranks(case, policy, nodes, groups):
    num_nodes, num_groups = hierarchy(case, nodes, groups)
    p = rebalance(policy=policy, num_nodes=num_nodes, num_groups=num_groups, **case)
    check_placement(p, case)
    if policy != "deepseek_hierarchical" or num_nodes == 1:
        # every alive slot is used unless max_replicas caps the replicas
        cap = math.inf if case["max_replicas"] is None else case["max_replicas"] * p.num_logical
        used = (p.phy2log >= 0).sum(axis=1)
        assert (used == min(cap, int(case["alive"].sum()) * case["slots_per_rank"])).all()


@PROPERTY
@given(case=cases(), policy=st.sampled_from(["round_robin", "deepseek_global"]))
def test_replicas_of_an_expert_never_share_a_rank_when_avoidable(case, policy):
    p = rebalance(policy=policy, **case)
    if p.num_logical >= case["slots_per_rank"]:       # else some rank must hold an expert twice
        assert not rank_has_duplicate(p, np.nonzero(case["alive"])[0])


@PROPERTY
@given(case=cases(), nodes=st.integers(0, 7), groups=st.integers(0, 7))
def test_hierarchical_keeps_groups_on_one_node_and_replicas_apart_within_it(case, nodes, groups):
    num_nodes, num_groups = hierarchy(case, nodes, groups)
    p = rebalance(policy="deepseek_hierarchical", num_nodes=num_nodes, num_groups=num_groups, **case)
    alive, ranks_per_node = case["alive"], case["num_ranks"] // num_nodes
    node_of_slot = np.arange(p.num_slots) // p.slots_per_rank // ranks_per_node
    group_size = p.num_logical // num_groups
    nodes_used = {node for node in range(num_nodes) if alive[node * ranks_per_node:(node + 1) * ranks_per_node].any()}
    room = sum(int(alive[n * ranks_per_node:(n + 1) * ranks_per_node].sum()) * p.slots_per_rank // group_size
               for n in nodes_used)
    if len(nodes_used) > 1 and len(nodes_used) <= num_groups and room >= num_groups:
        for layer in range(p.num_layers):
            for group in range(num_groups):
                held = np.isin(p.phy2log[layer], np.arange(group * group_size, (group + 1) * group_size))
                assert len(set(node_of_slot[held])) == 1, f"group {group} spans nodes in layer {layer}"
    for node in nodes_used:
        ranks = [r for r in range(node * ranks_per_node, (node + 1) * ranks_per_node) if alive[r]]
        held = p.phy2log[:, [r * p.slots_per_rank + s for r in ranks for s in range(p.slots_per_rank)]]
        distinct = min(len(set(row[row >= 0].tolist())) for row in held)
        if distinct >= p.slots_per_rank and p.logcnt.max() <= len(ranks):
            assert not rank_has_duplicate(p, ranks)


@PROPERTY
@given(case=cases(min_layers=4, max_layers=6, kinds=("zipf",)))
def test_deepseek_global_balances_skewed_loads_at_least_as_well_as_round_robin(case):
    ours = rebalance(policy="deepseek_global", **case).imbalance(case["loads"], case["alive"])
    theirs = rebalance(policy="round_robin", **case).imbalance(case["loads"], case["alive"])
    assert ours.mean() <= theirs.mean() + 1e-9


@PROPERTY
@given(case=cases(), policy=st.sampled_from(["round_robin", *DEEPSEEK]), victim=st.integers(0, 7),
       nodes=st.integers(0, 7), groups=st.integers(0, 7))
def test_previous_moves_nothing_when_nothing_changed_and_stays_balanced_after_a_failure(case, policy, victim,
                                                                                        nodes, groups):
    num_nodes, num_groups = hierarchy(case, nodes, groups)
    case = dict(case, num_nodes=num_nodes, num_groups=num_groups)
    before = rebalance(policy=policy, **case)
    assert movement(before, rebalance(policy=policy, previous=before, **case)).moved == 0
    alive_ranks = np.nonzero(case["alive"])[0]
    after_alive = case["alive"].copy()
    after_alive[alive_ranks[victim % len(alive_ranks)]] = False
    if after_alive.sum() * case["slots_per_rank"] < case["loads"].shape[1]:
        return
    after = dict(case, alive=after_alive)
    kept = rebalance(policy=policy, previous=before, **after)
    fresh = rebalance(policy=policy, **after)
    check_placement(kept, after)
    assert movement(before, kept, alive=after_alive).moved <= movement(before, fresh, alive=after_alive).moved
    if policy in DEEPSEEK:
        tolerance = pl.DEFAULT_STAY_TOLERANCE
        assert (kept.imbalance(case["loads"], after_alive)
                <= fresh.imbalance(case["loads"], after_alive) * (1 + tolerance) + 1e-9).all()


@PROPERTY
@given(case=cases(), other_seed=st.integers(0, 1000), victim=st.integers(0, 7))
def test_movement_counts_the_weights_to_load(case, other_seed, victim):
    old = rebalance(policy="deepseek_global", **case)
    alive = case["alive"].copy()
    alive[np.nonzero(alive)[0][victim % alive.sum()]] = False
    if alive.sum() * case["slots_per_rank"] < case["loads"].shape[1]:
        alive = case["alive"]
    loads = make_loads("random", *case["loads"].shape, other_seed)
    new = rebalance(loads, case["num_ranks"], case["slots_per_rank"], "deepseek_global", alive=alive,
                    max_replicas=case["max_replicas"])
    m = movement(old, new, expert_bytes=1000, alive=alive)
    slot_alive = np.repeat(alive, case["slots_per_rank"])
    moved = restored = 0
    for layer in range(old.num_layers):
        for slot in range(old.num_slots):
            was = old.phy2log[layer, slot] if slot_alive[slot] else -1
            moved += new.phy2log[layer, slot] >= 0 and new.phy2log[layer, slot] != was
        survivors = set(old.phy2log[layer, slot_alive].tolist())
        restored += sum(1 for e in range(old.num_logical) if e not in survivors)
    assert (m.moved, m.bytes, m.restored) == (moved, 1000 * moved, restored)
    assert m.moved_per_layer.sum() == m.moved and m.kept + m.moved == (new.phy2log >= 0).sum()


# ----- DeepSeek-V3's shape: 256 experts, 32 ranks, 256 redundant (16 slots per rank), 61 layers -----

@pytest.fixture(scope="module")
def deepseek_v3():
    loads = zipf_loads(61, 256, 1.2, seed=0)
    return loads, rebalance(loads, 32, 16, "deepseek_global")


def test_deepseek_global_balances_zipf_on_deepseek_v3_shape_within_one_percent(deepseek_v3):
    loads, placed = deepseek_v3
    balance = placed.imbalance(loads)
    assert balance.max() <= 1.01
    round_robin = rebalance(loads, 32, 16, "round_robin").imbalance(loads)
    assert round_robin.mean() > 2.0          # the load really is skewed


def test_killing_one_of_32_ranks_moves_at_most_its_experts_plus_ten_percent(deepseek_v3):
    loads, placed = deepseek_v3
    alive = np.ones(32, bool)
    alive[5] = False
    dead_rank_experts = int((placed.phy2log[:, 5 * 16:6 * 16] >= 0).sum())
    kept = rebalance(loads, 32, 16, "deepseek_global", alive=alive, previous=placed)
    fresh = rebalance(loads, 32, 16, "deepseek_global", alive=alive)
    assert movement(placed, kept, alive=alive).moved <= 1.1 * dead_rank_experts
    assert movement(placed, fresh, alive=alive).moved > 5 * dead_rank_experts    # what previous= saves
    assert kept.imbalance(loads, alive).max() <= 1.03


def test_hierarchical_on_four_nodes_balances_ranks_within_nodes_and_keeps_groups_on_nodes(deepseek_v3):
    # replicas never leave their group's node, so node loads follow the groups' (the hottest
    # expert's group alone exceeds a node's share under Zipf(1.2)); ranks within a node balance
    loads = deepseek_v3[0][:8]
    placed = rebalance(loads, 32, 16, "deepseek_hierarchical", num_nodes=4, num_groups=8)
    per_rank = placed.rank_loads(loads).reshape(8, 4, 8)                  # [layer, node, rank in node]
    assert (per_rank.max(axis=2) / per_rank.mean(axis=2)).max() <= 1.01
    assert placed.imbalance(loads).mean() < rebalance(loads, 32, 16, "round_robin").imbalance(loads).mean()
    node_of_slot = np.arange(512) // 16 // 8
    for layer in range(8):
        for group in range(8):
            held = (placed.phy2log[layer] >= 0) & (placed.phy2log[layer] // 32 == group)
            assert len(set(node_of_slot[held])) == 1


# ----- specific shapes -----

@pytest.mark.parametrize("policy", ["round_robin", *DEEPSEEK])
def test_without_redundancy_every_expert_has_exactly_one_replica(policy):
    loads = make_loads("zipf", 2, 24, 3)
    p = rebalance(loads, 4, 6, policy, num_nodes=2, num_groups=4)
    assert (p.logcnt == 1).all() and (p.phy2log >= 0).all()


@pytest.mark.parametrize("policy", ["round_robin", *DEEPSEEK])
def test_zero_loads_one_layer_and_a_prime_number_of_experts(policy):
    p = rebalance(np.zeros((1, 7)), 3, 4, policy, alive=[True, False, True])
    assert (p.phy2log[0, 4:8] == -1).all() and (p.logcnt >= 1).all() and p.logcnt.sum() == 8


def test_identical_ranks_when_each_rank_can_hold_every_expert():
    loads = np.array([[10.0, 1.0, 1.0]])
    p = rebalance(loads, 3, 4, "deepseek_global")
    assert np.allclose(p.imbalance(loads), 1.0)
    assert p.logcnt.tolist() == [[6, 3, 3]]           # each rank: expert 0 twice, 1 and 2 once


def test_max_replicas_fixes_the_width_and_leaves_spare_slots_empty():
    p = rebalance(make_loads("zipf", 3, 4, 0), 4, 4, "deepseek_global", max_replicas=2)
    assert p.log2phy.shape == (3, 4, 2) and (p.logcnt == 2).all() and (p.phy2log == -1).sum() == 3 * 8


def test_rank_loads_split_an_expert_over_its_replicas():
    p = Placement.from_phy2log([[0, 1, 0, 2]], num_logical=3, num_ranks=2)
    loads = np.array([[10.0, 4.0, 6.0]])
    assert p.rank_loads(loads).tolist() == [[9.0, 11.0]]
    assert p.imbalance(loads).tolist() == [11.0 / 10.0]


def test_a_registered_user_policy_is_used_and_its_output_checked():
    @pl.register_policy("test_reverse")
    def reverse(loads, num_ranks, slots_per_rank, alive, **_):
        slots = pl.check_capacity(loads.shape[1], num_ranks, slots_per_rank, alive)
        phy2log = np.full((loads.shape[0], num_ranks * slots_per_rank), -1)
        phy2log[:, slots] = (len(slots) - 1 - np.arange(len(slots))) % loads.shape[1]
        return phy2log

    @pl.register_policy("test_uses_dead_rank")
    def careless(loads, num_ranks, slots_per_rank, **_):
        return np.tile(np.arange(num_ranks * slots_per_rank) % loads.shape[1], (loads.shape[0], 1))

    assert {"test_reverse", "test_uses_dead_rank"} <= set(pl.policies())
    p = rebalance(np.ones((1, 4)), 2, 2, "test_reverse")
    assert p.phy2log.tolist() == [[3, 2, 1, 0]]
    with pytest.raises(PlacementError, match="dead rank 1"):
        rebalance(np.ones((1, 2)), 2, 2, "test_uses_dead_rank", alive=[True, False])


# ----- bad input gets a clear error -----

@pytest.mark.parametrize("kwargs, message", [
    (dict(loads=-np.ones((1, 4))), "loads must be >= 0"),
    (dict(loads=np.full((1, 4), np.nan)), "finite"),
    (dict(loads=np.ones(4)), r"loads must be \[layers"),
    (dict(policy="no_such_policy"), "unknown placement policy 'no_such_policy'"),
    (dict(alive=[True, False, False, False]), "1 alive ranks hold 2 slots, 2 too few for 4 logical experts"),
    (dict(alive=[True, True]), r"alive must have shape \(4,\)"),
    (dict(max_replicas=0), "max_replicas must be a positive integer"),
    (dict(slots_per_rank=0), "slots_per_rank must be a positive integer"),
    (dict(policy="deepseek_hierarchical", num_groups=3), "num_groups=3 must be >= 1 and divide the 4 experts"),
    (dict(policy="deepseek_hierarchical", num_nodes=3), "num_nodes=3 must be >= 1 and divide the 4 ranks"),
    (dict(previous=Placement.from_phy2log([[0, 1]], 2, 2)), "previous placement has 1 layers, 2 experts"),
])
def test_bad_input_is_rejected_naming_the_problem(kwargs, message):
    args = dict(loads=np.ones((1, 4)), num_ranks=4, slots_per_rank=2, policy="deepseek_global")
    args.update(kwargs)
    with pytest.raises(PlacementError, match=message):
        rebalance(**args)


def test_unknown_policy_is_also_a_key_error():
    with pytest.raises(KeyError):
        rebalance(np.ones((1, 2)), 1, 2, "nope")


@pytest.mark.parametrize("broken, alive, message", [
    (lambda p: Placement(p.phy2log, p.log2phy, p.logcnt + 1, 2, 2), None, r"logcnt\[0, 0\] = 2 but phy2log holds 1"),
    (lambda p: Placement(p.phy2log, p.log2phy[:, ::-1], p.logcnt, 2, 2), None, r"log2phy\[0, 0\]"),
    (lambda p: Placement.from_phy2log([[0, 1, 1, -1]], 3, 2), None, "logical expert 2 of layer 0 has no replica"),
    (lambda p: p, [True, False], "slot 2 of layer 0 holds an expert on dead rank 1"),
    (lambda p: Placement(p.phy2log, p.log2phy, p.logcnt, 3, 2), None, "phy2log has 4 slots, expected"),
])
def test_validate_names_the_first_broken_invariant(broken, alive, message):
    good = Placement.from_phy2log([[0, 1, 2, 3]], 4, 2)
    with pytest.raises(PlacementError, match=message):
        validate(broken(good), alive)


def test_movement_rejects_placements_of_different_shapes():
    with pytest.raises(PlacementError, match="placements differ in shape"):
        movement(Placement.from_phy2log([[0, 1]], 2, 2), Placement.from_phy2log([[0, 1, 0, 1]], 2, 2))


def _replicate_one_at_a_time(loads, num_replicas, max_count):
    """Reference for replicate_experts: each further replica to the expert with the most load per
    replica (ties: fewest replicas, then lowest id), one at a time."""
    logcnt = np.ones(loads.shape, np.int64)
    for _ in range(min(num_replicas, loads.shape[1] * max_count) - loads.shape[1]):
        for layer in range(loads.shape[0]):
            best = max((e for e in range(loads.shape[1]) if logcnt[layer, e] < max_count),
                       key=lambda e: (loads[layer, e] / logcnt[layer, e], -logcnt[layer, e], -e))
            logcnt[layer, best] += 1
    return logcnt


@PROPERTY
@given(kind=st.sampled_from(["zeros", "uniform", "zipf", "random", "one_hot", "integers"]),
       num_layers=st.integers(1, 3), num_logical=st.integers(1, 12), max_count=st.integers(1, 6),
       spare=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_replicate_experts_matches_handing_out_replicas_one_at_a_time(kind, num_layers, num_logical, max_count,
                                                                      spare, seed):
    loads = make_loads(kind, num_layers, num_logical, seed)
    expected = _replicate_one_at_a_time(loads, num_logical + spare, max_count).tolist()
    for impl in ("numpy", "native") if packing.native_built() else ("numpy",):
        assert replicate_experts(loads, num_logical + spare, max_count, impl=impl).tolist() == expected, impl


def test_balanced_packing_takes_strided_inputs_as_their_contiguous_copies():
    """initial_load / initial_holds may be views (a transposed array, a slice): the packing must read
    and update them as values, the same as for contiguous copies."""
    rng = np.random.default_rng(3)
    weight, keys = rng.random((3, 12)), rng.integers(-1, 5, (3, 12))
    load_t, holds_t = rng.random((4, 3)).T, rng.random((4, 5, 3)).transpose(2, 0, 1) < 0.2
    strided = balanced_packing(weight, keys, 5, [3, 3, 3, 3], initial_load=load_t, initial_holds=holds_t)
    dense = balanced_packing(weight, keys, 5, [3, 3, 3, 3], initial_load=np.ascontiguousarray(load_t),
                             initial_holds=np.ascontiguousarray(holds_t))
    assert strided.tolist() == dense.tolist()


# ----- the native loops (C++) against the numpy reference -----

# skipped where the extension is not built, except in CI (JEM_REQUIRE_FFI): there it must be
native = pytest.mark.skipif(not packing.native_built() and not os.environ.get("JEM_REQUIRE_FFI"),
                            reason="the placement._loops extension is not built")


@native
@PROPERTY
@given(num_layers=st.integers(1, 4), num_packs=st.integers(1, 9), per_pack=st.integers(1, 6),
       num_keys=st.integers(1, 12), kind=st.sampled_from(["zeros", "uniform", "random", "integers"]),
       with_preferred=st.booleans(), with_initial=st.booleans(), shares=st.booleans(), seed=st.integers(0, 2**16))
def test_native_packing_gives_the_numpy_references_packs(num_layers, num_packs, per_pack, num_keys, kind,
                                                          with_preferred, with_initial, shares, seed):
    """Same items, keys (constrained and not), present items, initial loads and holds, preferred packs,
    unequal shares: the C++ greedy loop packs exactly as the numpy loop does."""
    rng = np.random.default_rng(seed)
    items = num_packs * per_pack + int(rng.integers(0, 4))
    weight = make_loads(kind, num_layers, items, seed)
    keys = rng.integers(-1, num_keys, (num_layers, items))
    present = np.zeros((num_layers, items), bool)
    for layer in range(num_layers):
        present[layer, rng.permutation(items)[:num_packs * per_pack]] = True
    sizes = np.full(num_packs, per_pack)
    kw = dict(present=present, pack_shares=rng.random(num_packs) + 0.5 if shares else None,
              preferred=rng.random((num_layers, num_packs, num_keys)) < 0.3 if with_preferred else None,
              tolerance=float(rng.random() * 0.1))
    if with_initial:
        kw.update(initial_load=rng.random((num_layers, num_packs)) * weight.max(initial=1.0),
                  initial_holds=rng.random((num_layers, num_packs, num_keys)) < 0.2)
    reference = balanced_packing(weight, keys, num_keys, sizes, impl="numpy", **kw)
    assert balanced_packing(weight, keys, num_keys, sizes, impl="native", **kw).tolist() == reference.tolist()


@native
@PROPERTY
@given(num_layers=st.integers(1, 4), num_packs=st.integers(2, 12), slots=st.integers(1, 6),
       num_keys=st.integers(1, 20), kind=st.sampled_from(["zeros", "uniform", "random", "integers", "zipf"]),
       target=st.sampled_from([None, "mean", "loose"]), with_cost=st.booleans(), seed=st.integers(0, 2**16))
def test_native_swaps_give_the_numpy_references_grids(num_layers, num_packs, slots, num_keys, kind, target,
                                                      with_cost, seed):
    """Random grids with empty slots and duplicated experts, with and without a target and move costs:
    the C++ swap rounds make the same swaps, in the same places, as the numpy rounds."""
    rng = np.random.default_rng(seed)
    expert = np.where(rng.random((num_layers, num_packs, slots)) < 0.15, -1,
                      rng.integers(0, num_keys, (num_layers, num_packs, slots)))
    weight = np.where(expert >= 0, make_loads(kind, num_layers, num_packs * slots, seed).reshape(expert.shape), 0.0)
    load = weight.sum(axis=2)
    target_max = {None: None, "mean": load.mean(axis=1) * 1.001, "loose": load.max(axis=1) * 0.97}[target]
    cost = rng.integers(0, 2, expert.shape).astype(float) if with_cost else None
    grids = {}
    for impl in ("numpy", "native"):
        e, w, c = expert.copy(), weight.copy(), None if cost is None else cost.copy()
        swaps = refine_by_swaps(e, w, target_max, c, impl=impl)
        grids[impl] = (e.tolist(), w.tolist(), None if c is None else c.tolist(), swaps.tolist())
    assert grids["native"] == grids["numpy"]


@native
@pytest.mark.parametrize("failed", [0, 1, 3, 8])
def test_native_and_numpy_decide_the_same_plan_at_32_ranks(failed, monkeypatch):
    """The controller's decision (deepseek_global with previous=, over the survivors) on a 32-rank,
    256 + 256-slot, 8-layer Zipf shape: one plan whichever loops run."""
    loads = zipf_loads(8, 256, 1.2, seed=failed)
    before = rebalance(loads, 32, 16, "deepseek_global")
    alive = np.ones(32, bool)
    alive[np.arange(failed) * 4 + 1] = False
    plans = {}
    for impl in ("numpy", "native"):
        monkeypatch.setenv(packing.IMPL_ENV, impl)
        plans[impl] = rebalance(loads, 32, 16, "deepseek_global", alive=alive, previous=before).phy2log
    assert plans["native"].tolist() == plans["numpy"].tolist()


@pytest.mark.parametrize("impl", ["numpy", pytest.param("native", marks=native)])
def test_swaps_on_grids_without_slots_or_packs_make_none(impl):
    for shape in ((2, 3, 0), (2, 0, 4)):
        swaps = refine_by_swaps(np.zeros(shape, np.int64), np.zeros(shape), np.ones(2), impl=impl)
        assert swaps.tolist() == [0, 0]


def test_an_unknown_placement_impl_is_named():
    with pytest.raises(PlacementError, match="'auto', 'native' or 'numpy'"):
        refine_by_swaps(np.zeros((1, 2, 2), np.int64), np.ones((1, 2, 2)), impl="fortran")
