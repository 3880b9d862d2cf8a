"""jax-elastic-moe: a fault-tolerant expert-parallel MoE inference engine for JAX."""
from . import placement
from .placement import Placement

__all__ = ["placement", "Placement"]
