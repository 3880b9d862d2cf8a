"""The one table of sharding rules: parameter / activation -> logical axes -> mesh axes.

A new mesh (after a failure, say) is a new application of these rules, never new code."""
from __future__ import annotations

from jax.sharding import PartitionSpec as P

EP_AXIS = "ep"

# logical axis -> mesh axis (None: replicated)
MESH_RULES = {"slot": EP_AXIS, "batch": EP_AXIS}

# parameter name (last path element) -> logical axes of its dimensions; unlisted: replicated
# (expert params: the matrices and the per-slot arrays that go with them, whose paths end in the
# matrix's name: biases [slots, n], FP8 block scales [slots, r, c]; the leading slot axis is split)
PARAM_AXES = {
    "w_gate": ("slot",),
    "w_up": ("slot",),
    "w_down": ("slot",),
}


def spec(logical_axes) -> P:
    return P(*(MESH_RULES.get(a) if a else None for a in logical_axes))


def param_spec(path: tuple) -> P:
    axes = PARAM_AXES.get(path[-1])
    return spec(axes) if axes else P()


def batch_spec() -> P:
    """Activations, caches, tokens: batch first, split over the ranks (data-parallel attention)."""
    return spec(("batch",))
