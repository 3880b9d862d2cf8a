"""Expert placement: the Placement data and policies written as pure functions."""
from .core import Placement, PlacementError, validate
from .policies import policies, rebalance, register_policy

__all__ = ["Placement", "PlacementError", "validate", "policies", "rebalance", "register_policy"]
