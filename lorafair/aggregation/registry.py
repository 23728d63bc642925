"""Method name -> aggregator class, and the one way to build an aggregator from a name and options."""

from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass

from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.fedex_lora import FedExLoRA
from lorafair.aggregation.fedit import FedIT
from lorafair.aggregation.ffa_lora import FFALoRA
from lorafair.aggregation.flexlora import FlexLoRA
from lorafair.aggregation.flora import FLoRA
from lorafair.aggregation.florana import FLoRANA
from lorafair.aggregation.lorafair import LoRAFAIR

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (FedIT, FFALoRA, FLoRA, FlexLoRA, LoRAFAIR, FLoRANA, FedExLoRA)
}
METHODS = tuple(AGGREGATORS)


def method_options(method: str) -> dict[str, object]:
    """The options `method` accepts, with their defaults (e.g. to pick them out of a config)."""
    cls = _aggregator_class(method)
    if not is_dataclass(cls):
        return {}
    return {f.name: f.default for f in fields(cls) if f.init and f.default is not MISSING}


def build_aggregator(method: str, **options: object) -> Aggregator:
    """An aggregator for `method` (one of METHODS); unknown names, unknown options and bad values raise ValueError."""
    cls = _aggregator_class(method)
    valid = method_options(method)
    unknown = sorted(options.keys() - valid.keys())
    if unknown:
        accepted = ", ".join(valid) if valid else "none"
        raise ValueError(f"{method}: unknown option(s) {', '.join(unknown)}; its options are: {accepted}")
    return cls(**options)


def _aggregator_class(method: str) -> type[Aggregator]:
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregation method {method!r}; valid methods: {', '.join(METHODS)}")
    return AGGREGATORS[method]
