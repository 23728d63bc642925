"""Server-side aggregation of federated LoRA updates: pure torch, usable from any FL framework.

    from lorafair.aggregation import ClientUpdate, build_aggregator
    updates = [ClientUpdate(weight=n_k, lora={"blocks.0.attn.proj": (A_k, B_k)}, extra={"head.weight": h_k}), ...]
    out = build_aggregator("lorafair", lam=0.01).aggregate(updates)
    out.lora, out.merge, out.extra, out.metrics, out.bytes_up, out.bytes_down

A is r x in and B is out x r (peft). Client weights are normalised inside. One module per method; the shared
low-rank math (products of factors measured without forming them) lives in `lowrank`, dense textbook versions of
every method (for tests and benchmarks) in `reference`.
"""

from lorafair.aggregation.base import Aggregator, ClientUpdate, GlobalUpdate, OptionError, find_bad_updates
from lorafair.aggregation.registry import (
    build_aggregator,
    display_name,
    method_options,
    register_method,
    registered_methods,
    user_options,
)

__all__ = [
    "Aggregator",
    "ClientUpdate",
    "GlobalUpdate",
    "OptionError",
    "build_aggregator",
    "display_name",
    "find_bad_updates",
    "method_options",
    "register_method",
    "registered_methods",
    "user_options",
]
