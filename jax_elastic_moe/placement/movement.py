"""How many expert weights a change of placement moves, and choosing the plan that moves fewest."""
from __future__ import annotations

import dataclasses

import numpy as np

from .core import Placement, PlacementError, imbalance


@dataclasses.dataclass(frozen=True)
class Movement:
    """The cost of going from one placement to another.

    moved: (layer, slot) pairs whose expert weights must be loaded (the slot holds an expert it
        did not hold before); bytes: moved * expert_bytes.
    restored: (layer, logical expert) pairs with no replica on an alive rank of the old placement:
        their weights come from host memory or disk rather than from a surviving replica.
    kept: (layer, slot) pairs holding the same expert as before. freed: slots emptied.
    moved_per_layer: [L] int, `moved` split by layer."""
    moved: int
    bytes: int
    restored: int
    kept: int
    freed: int
    moved_per_layer: np.ndarray

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["moved_per_layer"] = self.moved_per_layer.tolist()
        return out


def loaded_slots(old_phy2log, new_phy2log) -> np.ndarray:
    """old_phy2log, new_phy2log: [L, S] -> [L] int64: slots that hold an expert they did not hold."""
    old_phy2log, new_phy2log = np.asarray(old_phy2log), np.asarray(new_phy2log)
    return ((new_phy2log >= 0) & (new_phy2log != old_phy2log)).sum(axis=1)


def movement(old: Placement, new: Placement, expert_bytes: int = 0, alive=None) -> Movement:
    """The expert weights to load to go from `old` to `new`.

    alive: [num_ranks] bool or None (all alive): the ranks whose old replicas survive. A slot on a
    dead rank that `new` fills again counts as moved, even if it held the same expert before (the
    rank restarted empty). expert_bytes: the size of one expert's weights."""
    if (old.num_layers, old.num_slots, old.num_logical, old.num_ranks) != (
            new.num_layers, new.num_slots, new.num_logical, new.num_ranks):
        raise PlacementError(
            f"placements differ in shape: old has {old.num_layers} layers, {old.num_slots} slots, "
            f"{old.num_logical} experts, {old.num_ranks} ranks; new has {new.num_layers}, "
            f"{new.num_slots}, {new.num_logical}, {new.num_ranks}")
    if expert_bytes < 0:
        raise PlacementError(f"expert_bytes must be >= 0, got {expert_bytes}")
    alive = np.ones(old.num_ranks, bool) if alive is None else np.asarray(alive, bool)
    if alive.shape != (old.num_ranks,):
        raise PlacementError(f"alive must have shape ({old.num_ranks},), got {alive.shape}")
    surviving = np.where(alive[old.slot_rank()][None, :], old.phy2log, -1)
    plan = plan_move_arrays(old.phy2log, new.phy2log, old.slots_per_rank, alive)
    loads = plan["kind"] != 0
    per_layer = np.bincount(plan["layer"][loads], minlength=new.num_layers).astype(np.int64)
    moved = int(per_layer.sum())
    backup = plan["kind"] == 3
    restored = len(set(zip(plan["layer"][backup].tolist(), plan["expert"][backup].tolist())))
    kept = int((~loads).sum())
    freed = int(((surviving >= 0) & (new.phy2log != surviving)).sum())
    return Movement(moved, moved * int(expert_bytes), restored, kept, freed, per_layer)


def closest_plan(previous_phy2log, plans, loads, slots_per_rank: int, alive, tolerance: float) -> np.ndarray:
    """Per layer, of the candidate plans within (1 + tolerance) of the best balance, the one that
    moves fewest expert weights from `previous_phy2log` (ties: the better balanced one).

    previous_phy2log: [L, S]; plans: list of [L, S] phy2log; loads: [L, E]; alive: [N] bool.
    Returns phy2log [L, S]."""
    plans = np.stack([np.asarray(p) for p in plans])                          # [C, L, S]
    balance = np.stack([imbalance(p, loads, slots_per_rank, alive) for p in plans])   # [C, L]
    moves = np.stack([loaded_slots(previous_phy2log, p) for p in plans]).astype(np.float64)
    eligible = balance <= balance.min(axis=0) * (1.0 + tolerance) + 1e-12
    # fewest moves first; among equal moves the better balance
    score = np.where(eligible, moves + balance / (balance.max() + 1.0), np.inf)
    choice = score.argmin(axis=0)                                                   # [L]
    return plans[choice, np.arange(plans.shape[1])]


@dataclasses.dataclass(frozen=True)
class SlotMove:
    """Where slot `slot` (global numbering) of MoE layer `layer` gets the expert it holds next:
    kind "kept" (it holds it already), "local" / "peer" (copied from slot `source` on the same / on
    another rank), or "backup" (no intact replica: host memory)."""
    layer: int
    slot: int
    expert: int
    kind: str
    source: int = -1


KINDS = ("kept", "local", "peer", "backup")


def plan_move_arrays(old_phy2log, new_phy2log, slots_per_rank: int, intact, targets=None) -> dict:
    """The weight moves that take the slots of ranks `targets` (default: all) from `old_phy2log` to
    `new_phy2log` ([L, S] each), as arrays over the slots that hold an expert next: layer, slot,
    expert, kind (an index into KINDS) and source slot (-1 for backup). intact: [N] bool, the ranks
    whose old slots still hold their weights (not dead, not restarted empty). The first intact slot
    holding an expert is its source. One plan for both runtime modes and for movement()."""
    old, new = np.asarray(old_phy2log), np.asarray(new_phy2log)
    intact = np.asarray(intact, bool)
    rank_of = np.arange(old.shape[1]) // slots_per_rank
    targets = np.ones(len(intact), bool) if targets is None else np.asarray(targets, bool)
    num_experts = int(max(old.max(initial=-1), new.max(initial=-1))) + 1
    parts = []
    for layer in range(new.shape[0]):
        held = np.nonzero((old[layer] >= 0) & intact[rank_of])[0]
        experts, first = np.unique(old[layer, held], return_index=True)
        holder = np.full(num_experts, -1)
        holder[experts] = held[first]
        t = np.nonzero((new[layer] >= 0) & targets[rank_of])[0]
        e = new[layer, t]
        src = holder[e]
        kept = intact[rank_of[t]] & (old[layer, t] == e)
        kind = np.where(kept, 0, np.where(src < 0, 3, np.where(rank_of[np.maximum(src, 0)] == rank_of[t], 1, 2)))
        src = np.where(kept, t, src)
        parts.append((np.full(len(t), layer), t, e, kind, src))
    cat = [np.concatenate(x) if parts else np.zeros(0, int) for x in zip(*parts)] if parts else [np.zeros(0, int)] * 5
    return dict(zip(("layer", "slot", "expert", "kind", "source"), cat))


def plan_moves(old_phy2log, new_phy2log, slots_per_rank: int, intact, targets=None) -> list[SlotMove]:
    """plan_move_arrays as a list of SlotMove."""
    a = plan_move_arrays(old_phy2log, new_phy2log, slots_per_rank, intact, targets)
    return [SlotMove(int(m), int(s), int(e), KINDS[k], int(src))
            for m, s, e, k, src in zip(a["layer"], a["slot"], a["expert"], a["kind"], a["source"])]
