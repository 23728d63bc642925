"""Server-side aggregation of federated LoRA updates: pure torch, usable from any FL framework.

    from lorafair.aggregation import ClientUpdate, build_aggregator
    updates = [ClientUpdate(weight=n_k, lora={"blocks.0.attn.proj": (A_k, B_k)}, extra={"head.weight": h_k}), ...]
    out = build_aggregator("lorafair", lam=0.01).aggregate(updates)
    out.lora, out.merge, out.extra, out.metrics, out.bytes_up, out.bytes_down

A is r x in and B is out x r (peft). Client weights are normalised inside. The same round can be folded as its
updates arrive: `state = aggregator.start(like=u_0, clients=K)`, `state.add(u)` per client, `state.finish()`
(`streaming`). One module per method; the ideal update sum p_k B_k A_k is held factored or dense (`ideal`),
whichever the cost model (`cost`) finds cheaper; the shared low-rank math lives in `lowrank`, dense textbook
versions of every method (for tests and benchmarks) in `reference`. Clients may have different ranks: `ranks`
states the one scaling convention, and `GlobalUpdate.lora_for(rank)` gives each rank its starting pairs. What a
method's clients train, upload and keep each round is its `ClientRule` (`rules`, `Aggregator.client_rule`).
"""

from lorafair.aggregation.base import Aggregator, OptionError
from lorafair.aggregation.fedsb import core_of, gradient_start
from lorafair.aggregation.frlora import svd_start
from lorafair.aggregation.registry import (
    build_aggregator,
    display_name,
    method_class,
    method_options,
    register_method,
    registered_methods,
    user_options,
)
from lorafair.aggregation.rules import ClientRule, LocalAdapter
from lorafair.aggregation.streaming import RoundState
from lorafair.aggregation.updates import ClientUpdate, GlobalUpdate, find_bad_updates

__all__ = [
    "Aggregator",
    "ClientRule",
    "ClientUpdate",
    "GlobalUpdate",
    "LocalAdapter",
    "OptionError",
    "RoundState",
    "build_aggregator",
    "core_of",
    "display_name",
    "find_bad_updates",
    "gradient_start",
    "method_class",
    "method_options",
    "register_method",
    "registered_methods",
    "svd_start",
    "user_options",
]
