"""Availability planner: how many rank failures a placement survives, and how well policies balance.

For k = 1..N failed ranks of an N-rank expert-parallel deployment:
  (a) simultaneous random failures: the probability that some logical expert of some layer loses
      all its replicas (exact where the k-subsets to check are few, else Monte Carlo with a 95%
      Wilson interval), for the elastic policy's placement under a uniform and a Zipf load;
  (b) the worst case: the fewest failures that can lose an expert (an adversary's choice);
  (c) sequential failures with re-placement between them (the engine's recovery): ranks die one
      at a time and the policy re-places over the survivors with previous=; served while the
      survivors' slots hold every logical expert, i.e. (N - k) * slots_per_rank >= E.
Plus the load imbalance (max / mean rank load) of every registered policy on both loads.

`jem plan` (bench/plan.py) prints, saves and plots the report `plan` returns.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time

import numpy as np

from .core import Placement, PlacementError
from .movement import movement
from .policies import policies, rebalance

BYTES_PER_PARAM = 2          # bf16 expert weights
EXPERT_MATRICES = 3          # gate, up and down projections


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model config: experts, MoE layers, expert size."""
    name: str
    num_logical: int
    num_moe_layers: int
    hidden_size: int
    expert_intermediate_size: int
    num_groups: int = 1              # DeepSeek's n_group: expert groups for hierarchical balancing

    def expert_bytes(self, bytes_per_param: int = BYTES_PER_PARAM) -> int:
        """Bytes of one routed expert's weights (gate, up, down)."""
        return EXPERT_MATRICES * self.hidden_size * self.expert_intermediate_size * int(bytes_per_param)


def model_shape(config: dict, name: str = "model") -> ModelShape:
    """Reads a Hugging Face style config dict (DeepSeek-V3, Qwen3-MoE, Mixtral keys)."""
    def first(*keys):
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        raise PlacementError(f"config {name!r} has none of the keys {list(keys)}")
    num_logical = int(first("n_routed_experts", "num_local_experts", "num_experts"))
    num_layers = int(first("num_hidden_layers"))
    if config.get("first_k_dense_replace") is not None:               # DeepSeek: dense first layers
        num_moe = num_layers - int(config["first_k_dense_replace"])
    else:                                                             # Qwen-MoE: sparse step, dense list
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or [])
        num_moe = sum(1 for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    if num_logical < 1 or num_moe < 1:
        raise PlacementError(f"config {name!r} has {num_logical} routed experts and {num_moe} MoE layers")
    return ModelShape(name=str(config.get("model_type", name)), num_logical=num_logical, num_moe_layers=num_moe,
                      hidden_size=int(first("hidden_size")),
                      expert_intermediate_size=int(first("moe_intermediate_size", "intermediate_size")),
                      num_groups=int(config.get("n_group") or 1))


def read_model_shape(path: str) -> ModelShape:
    """Reads a YAML preset (a path, or a preset name such as "deepseek_v3") into a ModelShape."""
    import yaml

    from ..config import resolve_preset
    path = resolve_preset(path)
    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise PlacementError(f"{path}: expected a mapping of config keys, got {type(config).__name__}")
    return model_shape(config, name=path)


def zipf_loads(num_layers: int, num_logical: int, exponent: float = 1.2, tokens_per_layer: float = 65536.0,
               seed: int = 0) -> np.ndarray:
    """[L, E] float64: expected token counts when the i-th most popular expert of a layer gets a
    share proportional to i**-exponent; which expert is the i-th most popular differs per layer."""
    rng = np.random.default_rng(seed)
    share = np.arange(1, num_logical + 1, dtype=np.float64) ** -float(exponent)
    share *= tokens_per_layer / share.sum()
    return np.stack([share[rng.permutation(num_logical)] for _ in range(num_layers)])


def uniform_loads(num_layers: int, num_logical: int, tokens_per_layer: float = 65536.0) -> np.ndarray:
    """[L, E] float64: every expert gets the same share of the tokens."""
    return np.full((num_layers, num_logical), tokens_per_layer / num_logical)


def minimal_rank_sets(placement: Placement) -> np.ndarray:
    """[U, N] bool: the distinct sets of ranks holding some logical expert's replicas, keeping only
    those containing no smaller such set (losing a superset implies losing the subset)."""
    held = np.zeros((placement.num_layers, placement.num_logical, placement.num_ranks), bool)
    layer, slot = np.nonzero(placement.phy2log >= 0)
    held[layer, placement.phy2log[layer, slot], slot // placement.slots_per_rank] = True
    sets = np.unique(held.reshape(-1, placement.num_ranks), axis=0)
    sets = sets[sets.any(axis=1)]
    sets = sets[np.argsort(sets.sum(axis=1), kind="stable")]
    size = sets.sum(axis=1)
    shared = sets.astype(np.float32) @ sets.T.astype(np.float32)          # |A & B|
    contains_smaller = (shared == size[None, :]) & (size[None, :] < size[:, None])
    return sets[~contains_smaller.any(axis=1)]


def _count_losing(rank_sets, failed) -> int:
    """rank_sets [U, N] bool, failed [B, N] bool -> how many failure sets contain some rank set."""
    outside = (~failed).astype(np.float32)
    losing = 0
    for start in range(0, len(failed), 4096):
        missing = rank_sets.astype(np.float32) @ outside[start:start + 4096].T        # [U, b]
        losing += int((missing == 0).any(axis=0).sum())
    return losing


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def loss_probability(rank_sets, num_ranks: int, num_failed: int, exact_limit: int = 200_000,
                     samples: int = 20_000, rng=None) -> dict:
    """P(some logical expert loses all replicas) when `num_failed` of `num_ranks` ranks, chosen
    uniformly at random, fail at once. rank_sets: [U, N] bool from minimal_rank_sets.

    Ranks that alone hold an expert fail the placement whenever they are hit; the failure sets
    avoiding them are counted one by one when there are at most exact_limit of them, else sampled.
    Returns {probability, low, high, method: "exact" | "monte_carlo", samples}."""
    k = int(num_failed)
    total = math.comb(num_ranks, k)
    size = rank_sets.sum(axis=1)
    if k == 0 or len(size) == 0 or k < size.min():
        return dict(probability=0.0, low=0.0, high=0.0, method="exact", samples=0)
    critical = rank_sets[size == 1].any(axis=0)
    others = np.nonzero(~critical)[0]
    rest = rank_sets[size > 1]                  # minimal, so they avoid the critical ranks
    avoiding = math.comb(len(others), k)
    if len(rest) == 0 or avoiding == 0:
        surviving = avoiding
    elif avoiding <= exact_limit:
        surviving = 0
        chosen = itertools.combinations(others.tolist(), k)
        while batch := list(itertools.islice(chosen, 65536)):
            failed = np.zeros((len(batch), num_ranks), bool)
            failed[np.repeat(np.arange(len(batch)), k), np.asarray(batch).ravel()] = True
            surviving += len(batch) - _count_losing(rest, failed)
    else:
        rng = np.random.default_rng(0) if rng is None else rng
        failed = np.zeros((samples, num_ranks), bool)
        picks = np.argsort(rng.random((samples, num_ranks)), axis=1)[:, :k]
        failed[np.arange(samples)[:, None], picks] = True
        losing = _count_losing(rank_sets, failed)
        low, high = wilson_interval(losing, samples)
        return dict(probability=losing / samples, low=low, high=high, method="monte_carlo", samples=samples)
    probability = 1.0 - surviving / total
    return dict(probability=probability, low=probability, high=probability, method="exact", samples=0)


def simultaneous_failures(placement: Placement, max_failed: int, exact_limit: int = 200_000,
                          samples: int = 20_000, seed: int = 0) -> list[dict]:
    """loss_probability for k = 1..max_failed. Once every k-subset loses an expert, every larger
    one does too, so the rest are exact 1."""
    rank_sets = minimal_rank_sets(placement)
    rng = np.random.default_rng(seed)
    rows, certain = [], False
    for k in range(1, max_failed + 1):
        if certain:
            row = dict(probability=1.0, low=1.0, high=1.0, method="exact", samples=0)
        else:
            row = loss_probability(rank_sets, placement.num_ranks, k, exact_limit, samples, rng)
            certain = row["method"] == "exact" and row["probability"] == 1.0
        rows.append(dict(k=k, **row))
    return rows


def min_failures_to_lose(placement: Placement) -> int:
    """The worst case: the fewest failed ranks that can leave some logical expert without a
    replica (the fewest distinct ranks holding one expert)."""
    return int(minimal_rank_sets(placement).sum(axis=1).min())


def sequential_failures(loads, num_ranks: int, slots_per_rank: int, policy: str, expert_bytes: int = 0,
                        num_nodes: int = 1, num_groups: int = 1, seed: int = 0, max_failed: int | None = None) -> dict:
    """Ranks fail one at a time, in a random order (seeded); after each failure the policy re-places
    the experts over the survivors with previous= (what the engine's recovery does). loads: [L, E].

    Returns {largest_k_served, capacity_bound, stop_reason, steps: [{k, failed_rank, alive_slots,
    moved, moved_bytes, restored, imbalance_mean, imbalance_max, seconds}]}. `restored` counts the
    (layer, expert) pairs that had all their replicas on the failed rank: they come from host memory
    or disk. capacity_bound = N - ceil(E / slots_per_rank), the most failures slots alone allow."""
    num_logical = np.shape(loads)[1]
    order = np.random.default_rng(seed).permutation(num_ranks)
    max_failed = num_ranks if max_failed is None else int(max_failed)
    common = dict(policy=policy, num_nodes=num_nodes, num_groups=num_groups)
    alive = np.ones(num_ranks, bool)
    current = rebalance(loads, num_ranks, slots_per_rank, alive=alive, **common)
    steps, stop_reason = [], f"stopped after {max_failed} failures (--max-failures)"
    for k, rank in enumerate(order[:max_failed], start=1):
        alive = alive.copy()
        alive[rank] = False
        start = time.perf_counter()
        try:
            placed = rebalance(loads, num_ranks, slots_per_rank, alive=alive, previous=current, **common)
        except PlacementError as error:
            stop_reason = f"failure {k} (rank {rank}): {error}"
            break
        seconds = time.perf_counter() - start
        moved = movement(current, placed, expert_bytes, alive=alive)
        balance = placed.imbalance(loads, alive)
        steps.append(dict(k=k, failed_rank=int(rank), alive_slots=int(alive.sum()) * slots_per_rank,
                          moved=moved.moved, moved_bytes=moved.bytes, restored=moved.restored,
                          imbalance_mean=float(balance.mean()), imbalance_max=float(balance.max()),
                          seconds=seconds))
        current = placed
    return dict(largest_k_served=len(steps), capacity_bound=num_ranks - math.ceil(num_logical / slots_per_rank),
                stop_reason=stop_reason, steps=steps)


def policy_imbalance(loads_by_name: dict, num_ranks: int, slots_per_rank: int, num_nodes: int = 1,
                     num_groups: int = 1, names=None) -> dict:
    """{policy: {load name: {mean, max, seconds}}}: max / mean rank load per layer (mean and worst
    over layers) of each policy, all ranks alive, and the seconds one rebalance took."""
    out = {}
    for name in (policies() if names is None else names):
        out[name] = {}
        for load_name, loads in loads_by_name.items():
            start = time.perf_counter()
            placed = rebalance(loads, num_ranks, slots_per_rank, policy=name, num_nodes=num_nodes,
                               num_groups=num_groups)
            seconds = time.perf_counter() - start
            balance = placed.imbalance(loads)
            out[name][load_name] = dict(mean=float(balance.mean()), max=float(balance.max()), seconds=seconds)
    return out


def plan(shape: ModelShape, num_ranks: int, num_redundant: int, num_nodes: int = 1, num_groups: int | None = None,
         policy: str = "deepseek_global", zipf_exponent: float = 1.2, seed: int = 0, samples: int = 20_000,
         exact_limit: int = 200_000, bytes_per_param: int = BYTES_PER_PARAM, num_layers: int | None = None) -> dict:
    """The whole availability analysis as a JSON-ready dict (see the module docstring).
    num_layers: analyse this many MoE layers instead of the model's (quicker, fewer constraints)."""
    num_slots = shape.num_logical + int(num_redundant)
    if num_ranks < 1 or num_redundant < 0:
        raise PlacementError(f"need ranks >= 1 and redundant >= 0, got {num_ranks} and {num_redundant}")
    if num_slots % num_ranks:
        raise PlacementError(f"{shape.num_logical} experts + {num_redundant} redundant = {num_slots} slots do not "
                             f"divide over {num_ranks} ranks")
    if num_nodes < 1 or num_ranks % num_nodes:
        raise PlacementError(f"--nodes {num_nodes} must divide --ranks {num_ranks}")
    slots_per_rank = num_slots // num_ranks
    if num_groups is None:
        num_groups = shape.num_groups if shape.num_logical % shape.num_groups == 0 else 1
    layers = shape.num_moe_layers if num_layers is None else int(num_layers)
    loads = {"uniform": uniform_loads(layers, shape.num_logical),
             f"zipf({zipf_exponent:g})": zipf_loads(layers, shape.num_logical, zipf_exponent, seed=seed)}
    zipf_name = f"zipf({zipf_exponent:g})"
    expert_bytes = shape.expert_bytes(bytes_per_param)
    groups = dict(num_nodes=num_nodes, num_groups=num_groups)
    availability = {}
    for load_name, load in loads.items():
        placed = rebalance(load, num_ranks, slots_per_rank, policy=policy, **groups)
        availability[load_name] = dict(
            min_failures_to_lose=min_failures_to_lose(placed),
            replicas_min=int(placed.logcnt.min()), replicas_max=int(placed.logcnt.max()),
            rows=simultaneous_failures(placed, num_ranks, exact_limit, samples, seed))
    return dict(
        config=shape.name, num_logical=shape.num_logical, num_moe_layers=layers, expert_bytes=expert_bytes,
        ranks=num_ranks, redundant=int(num_redundant), slots_per_rank=slots_per_rank, num_slots=num_slots,
        nodes=num_nodes, groups=num_groups, policy=policy, seed=seed, loads=list(loads),
        simultaneous=availability,
        sequential=sequential_failures(loads[zipf_name], num_ranks, slots_per_rank, policy, expert_bytes,
                                       seed=seed, **groups),
        imbalance=policy_imbalance(loads, num_ranks, slots_per_rank, **groups))
