"""Expert placement: the Placement data, policies written as pure functions, movement, planner."""
from .core import Placement, PlacementError, imbalance, rank_loads, replica_counts, validate
from .movement import Movement, movement
from .policies import (DEFAULT_STAY_TOLERANCE, UnknownPolicyError, check_capacity, policies, rebalance,
                       register_policy)

__all__ = ["Placement", "PlacementError", "validate", "imbalance", "rank_loads", "replica_counts",
           "Movement", "movement", "policies", "rebalance", "register_policy", "check_capacity",
           "UnknownPolicyError", "DEFAULT_STAY_TOLERANCE"]
