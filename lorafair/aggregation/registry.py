"""The one list of methods. Each aggregator class declares its name, display name, options (dataclass fields with
defaults, docstrings and checks in __post_init__), traits (class attributes of `Aggregator`: whether it merges
into the frozen weights, needs only sums, takes clients of different ranks, what its exported model is) and its
client rule (`Aggregator.client_rule`: which factors its clients train, upload and keep each round); the CLI, --help,
config validation, the round loop, the Flower integration, the export, compare and the report tables all read them
from here.

Adding a method: write `lorafair/aggregation/<method>.py` with an Aggregator subclass, and add it to BUILT_IN below
(or call `register_method(cls)` before `lorafair.config` is imported, from code of your own).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any, get_type_hints

from docstring_parser import parse_from_object

from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.feddpa import FedDPA
from lorafair.aggregation.fedex_lora import FedExLoRA
from lorafair.aggregation.fedit import FedIT
from lorafair.aggregation.fedsa_lora import FedSALoRA
from lorafair.aggregation.fedsb import FedSB
from lorafair.aggregation.fedsvd import FedSVD
from lorafair.aggregation.ffa_lora import FFALoRA
from lorafair.aggregation.flexlora import FlexLoRA
from lorafair.aggregation.flora import FLoRA
from lorafair.aggregation.florana import FLoRANA
from lorafair.aggregation.frlora import FRLoRA
from lorafair.aggregation.hetlora import HetLoRA
from lorafair.aggregation.lorafair import LoRAFAIR
from lorafair.aggregation.rolora import RoLoRA

SERVER_SEED = "seed"
"""An option of this name is the seed the server derives from (run seed, round), never a user setting."""

_REGISTERED: dict[str, type[Aggregator]] = {}


@dataclass(frozen=True)
class Option:
    """One user-facing option of one or more methods."""

    name: str
    type: Any
    default: Any
    doc: str
    methods: tuple[str, ...]


def register_method(cls: type[Aggregator]) -> type[Aggregator]:
    """Make `cls` a method under `cls.name`; its options may share a name with another method's only with the
    same type and default (they are one config key)."""
    for attribute in ("name", "display_name"):
        if not isinstance(getattr(cls, attribute, None), str):
            raise TypeError(f"{cls.__name__} must declare {attribute}: ClassVar[str]")
    if cls.name in _REGISTERED and _REGISTERED[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered by {_REGISTERED[cls.name].__name__}")
    for option in _own_options(cls):
        for other in user_options().values():
            if other.name == option.name and (other.type, other.default) != (option.type, option.default):
                raise ValueError(f"{cls.name}: option {option.name} is declared as {option.type} = "
                                 f"{option.default!r} by {', '.join(other.methods)}, as {other.type} = "
                                 f"{option.default!r} here; rename it or make them agree")
    _REGISTERED[cls.name] = cls
    return cls


def registered_methods() -> tuple[str, ...]:
    """Every method name, in registration order (the order of tables and plot colours)."""
    return tuple(_REGISTERED)


def display_name(method: str) -> str:
    """How the paper writes `method` (FedIT, LoRA-FAIR, ...); an unknown name as it is."""
    return _REGISTERED[method].display_name if method in _REGISTERED else method


def method_class(method: str) -> type[Aggregator]:
    """The aggregator class of `method`, whose class attributes are the method's traits (`Aggregator.merges`,
    `sums_only`, `mixed_ranks`, ...); an unknown name raises ValueError."""
    return _aggregator_class(method)


def method_options(method: str) -> dict[str, object]:
    """The options `method` accepts (its server seed included), with their defaults."""
    cls = _aggregator_class(method)
    if not is_dataclass(cls):
        return {}
    return {f.name: f.default for f in fields(cls) if f.init and f.default is not MISSING}


def user_options() -> dict[str, Option]:
    """Every option a user can set, over all methods (one config key each), in registration order."""
    merged: dict[str, Option] = {}
    for cls in _REGISTERED.values():
        for option in _own_options(cls):
            known = merged.get(option.name)
            methods = (*known.methods, cls.name) if known else (cls.name,)
            merged[option.name] = Option(option.name, option.type, option.default, option.doc, methods)
    return merged


def build_aggregator(method: str, **options: object) -> Aggregator:
    """An aggregator for `method`; unknown names, unknown options and bad values raise ValueError."""
    cls = _aggregator_class(method)
    valid = method_options(method)
    unknown = sorted(options.keys() - valid.keys())
    if unknown:
        accepted = ", ".join(valid) if valid else "none"
        raise ValueError(f"{method}: unknown option(s) {', '.join(unknown)}; its options are: {accepted}")
    return cls(**options)


def _own_options(cls: type[Aggregator]) -> list[Option]:
    if not is_dataclass(cls):
        return []
    hints = get_type_hints(cls)
    docs = {param.arg_name: param.description or "" for param in parse_from_object(cls).params}
    return [Option(f.name, hints[f.name], f.default, " ".join(docs.get(f.name, "").split()), (cls.name,))
            for f in fields(cls) if f.init and f.default is not MISSING and f.name != SERVER_SEED]


def _aggregator_class(method: str) -> type[Aggregator]:
    if method not in _REGISTERED:
        raise ValueError(f"unknown aggregation method {method!r}; valid methods: {', '.join(_REGISTERED)}")
    return _REGISTERED[method]


BUILT_IN = (FedIT, FFALoRA, FLoRA, FlexLoRA, LoRAFAIR, FLoRANA, FedExLoRA, FedSALoRA, RoLoRA, FedSVD,
            HetLoRA, FRLoRA, FedDPA, FedSB)
for _method in BUILT_IN:
    register_method(_method)
