"""Every random start of a run comes from a seed derived here, so a draw depends on what it is for and never on the
process, rank or moment it happens in; and a fresh LoRA start is drawn here, the one way lorafair draws it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lorafair.keys import Pairs


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a purpose and integers, e.g. ("client", seed, round, id); distinct tuples give unrelated
    random streams."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded with `derive_seed(*parts)`."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def fresh_lora(like: Mapping[str, tuple[Tensor, Tensor]], generator: torch.Generator) -> Pairs:
    """A fresh LoRA start as peft makes it, in `like`'s shapes and dtypes: A Kaiming-uniform (a = sqrt(5)) but
    drawn from `generator`, B zero, so the update starts at zero. Layers draw in `like`'s order, on the CPU, so equal
    generators give equal factors whatever the device."""
    fresh = {}
    for layer, (lora_a, lora_b) in like.items():
        new_a = torch.empty(lora_a.shape, dtype=lora_a.dtype)
        torch.nn.init.kaiming_uniform_(new_a, a=math.sqrt(5), generator=generator)
        fresh[layer] = (new_a, torch.zeros_like(lora_b))
    return fresh
