"""jax-elastic-moe: a fault-tolerant expert-parallel MoE inference engine for JAX."""
from . import placement
from .config import ConfigError, ModelConfig
from .engine import Engine, GenerationResult
from .kinds import Backend, FailureKind, Mode
from .model.loader import CheckpointError
from .placement import Placement, PlacementError

__all__ = ["Engine", "GenerationResult", "ModelConfig", "ConfigError", "CheckpointError", "Placement",
           "PlacementError", "placement", "Mode", "Backend", "FailureKind"]
