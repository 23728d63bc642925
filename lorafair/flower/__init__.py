"""Flower integration (`pip install lorafair[flower]`): every lorafair aggregation method as a Flower strategy.

    from lorafair.flower import LoraStrategy
    strategy = LoraStrategy("lorafair", {"lam": 0.01}, fraction_train=0.5, min_available_nodes=6)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(get_peft_model_state_dict(model)), num_rounds=30)

The core package never imports this module: only code that asks for Flower pays for it.
"""

from lorafair.flower.records import (
    arrays_to_state,
    hold_pending,
    merges_to_apply,
    own_tensors,
    rule_of_config,
    state_to_arrays,
)
from lorafair.flower.strategy import LoraStrategy, check_secure_aggregation

__all__ = [
    "LoraStrategy",
    "arrays_to_state",
    "check_secure_aggregation",
    "hold_pending",
    "merges_to_apply",
    "own_tensors",
    "rule_of_config",
    "state_to_arrays",
]
