"""The one format of named tensors on the wire and on disk.

Named tensors are keyed "<kind>/<layer>/<factor>" for LoRA pairs ("lora/blocks.0.attn.proj/A") and "<kind>/<name>"
for single tensors ("extra/head.weight", "base/blocks.0.attn.proj"): client updates, the server's answer, the resume
state and the checkpoints all use it, so any transport moves a flat {key: tensor} mapping and small plain values.
"""

from __future__ import annotations

from torch import Tensor

Pairs = dict[str, tuple[Tensor, Tensor]]
"""Layer name -> (A: r x in, B: out x r)."""


def pack_pairs(kind: str, pairs: Pairs | None) -> dict[str, Tensor]:
    """{"blocks.0.attn.proj": (A, B)} -> {"lora/blocks.0.attn.proj/A": A, "lora/blocks.0.attn.proj/B": B}."""
    return {f"{kind}/{name}/{factor}": tensor for name, pair in (pairs or {}).items()
            for factor, tensor in zip("AB", pair, strict=True)}


def pack(kind: str, tensors: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """{"head.weight": t} -> {"extra/head.weight": t}."""
    return {f"{kind}/{name}": tensor for name, tensor in (tensors or {}).items()}


def unpack_pairs(tensors: dict[str, Tensor], kind: str) -> Pairs:
    """Inverse of `pack_pairs` for one kind of a mixed mapping."""
    names = [key[len(kind) + 1:-2] for key in tensors if key.startswith(f"{kind}/") and key.endswith("/A")]
    return {name: (tensors[f"{kind}/{name}/A"], tensors[f"{kind}/{name}/B"]) for name in names}


def unpack(tensors: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """Inverse of `pack` for one kind of a mixed mapping."""
    return {key[len(kind) + 1:]: tensor for key, tensor in tensors.items() if key.startswith(f"{kind}/")}


def pack_by_rank(by_rank: dict[int, Pairs] | None) -> dict[str, Tensor]:
    """Starting pairs of lower ranks under the kinds "lora_r<rank>" ("lora_r4/blocks.0.attn.proj/A")."""
    return {key: tensor for rank, pairs in (by_rank or {}).items()
            for key, tensor in pack_pairs(f"lora_r{rank}", pairs).items()}


def unpack_by_rank(tensors: dict[str, Tensor]) -> dict[int, Pairs]:
    """Inverse of `pack_by_rank` for a mixed mapping."""
    kinds = sorted({key.split("/")[0] for key in tensors if key.startswith("lora_r")}, key=lambda k: int(k[6:]))
    return {int(kind[6:]): unpack_pairs(tensors, kind) for kind in kinds}
