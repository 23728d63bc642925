"""The formats of named tensors on the wire and on disk, each written and read here only.

lorafair's own (client updates, the server's answer, the resume state, the Flower apps' messages): LoRA pairs keyed
"<kind>/<layer>/<factor>" ("lora/blocks.0.attn.proj/A") and single tensors "<kind>/<name>" ("extra/head.weight",
"base/blocks.0.attn.proj"), so any transport moves a flat {key: tensor} mapping and small plain values. The kinds:
"lora", "extra", "base", "merge/<index>" (a Flower node's pending merges), "lora_r<rank>" (the starting pairs of a
lower rank) and "client<id>.lora" / "client<id>.extra" (what a client keeps of its own between rounds: its whole
state under the local bound, the factors its method keeps, "client3.lora/blocks.0.attn.proj/B", otherwise), among
them a local adapter's pairs ("local/blocks.0.attn.proj/A") and the summary of its training inputs
("local_features").

A checkpoint nests its pairs instead ({layer: {"A": A, "B": B}}: `nest_pairs`). peft's state dicts (the Flower
strategy's records, an export's adapter) key a layer L's factors "L.lora_A.weight" and "L.lora_B.weight".
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

Pairs = dict[str, tuple[Tensor, Tensor]]
"""Layer name -> (A: r x in, B: out x r)."""


LOCAL = "local"
"""The kind of a client's local adapter, a LoRA pair of its own per layer (`ClientRule.local`)."""
LOCAL_FEATURES = "local_features"
"""The key of the mean of a client's normalised training-input representations, kept with its local adapter."""


def pair_key(kind: str, layer: str, factor: str) -> str:
    """The key of one factor ("A" or "B") of a layer's pair: "lora/blocks.0.attn.proj/A"."""
    return f"{kind}/{layer}/{factor}"


def pack_pairs(kind: str, pairs: Pairs | None) -> dict[str, Tensor]:
    """{"blocks.0.attn.proj": (A, B)} -> {"lora/blocks.0.attn.proj/A": A, "lora/blocks.0.attn.proj/B": B}."""
    return {pair_key(kind, name, factor): tensor for name, pair in (pairs or {}).items()
            for factor, tensor in zip("AB", pair, strict=True)}


def pack(kind: str, tensors: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """{"head.weight": t} -> {"extra/head.weight": t}."""
    return {f"{kind}/{name}": tensor for name, tensor in (tensors or {}).items()}


def unpack_pairs(tensors: dict[str, Tensor], kind: str) -> Pairs:
    """Inverse of `pack_pairs` for one kind of a mixed mapping."""
    names = [key[len(kind) + 1:-2] for key in tensors if key.startswith(f"{kind}/") and key.endswith("/A")]
    return {name: (tensors[pair_key(kind, name, "A")], tensors[pair_key(kind, name, "B")]) for name in names}


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


def is_by_rank(key: str) -> bool:
    """Whether `key` holds a starting pair of a lower rank (`pack_by_rank`)."""
    return key.startswith("lora_r")


def pack_clients(states: Mapping[int, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Each client's own tensors, keyed in this format ("lora/blocks.0.attn.proj/B", "extra/head.weight"), under
    the client's kinds: "client3.lora/blocks.0.attn.proj/B", "client3.extra/head.weight"."""
    return {f"client{client}.{key}": tensor for client, tensors in states.items() for key, tensor in tensors.items()}


def unpack_clients(tensors: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """Inverse of `pack_clients` for a mixed mapping, clients in order."""
    states: dict[int, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("client"):
            client, _, own_key = key.partition(".")
            states.setdefault(int(client[6:]), {})[own_key] = tensor
    return dict(sorted(states.items()))


def merge_kind(index: int) -> str:
    """The kind of the merge of the given index among a run's merges: "merge/3"."""
    return f"merge/{index}"


def merge_indices(tensors: Mapping[str, Tensor]) -> list[int]:
    """The indices of the merges (`merge_kind`) a mapping holds, in order."""
    return sorted({int(key.split("/")[1]) for key in tensors})


def nest_pairs(pairs: Pairs) -> dict[str, dict[str, Tensor]]:
    """A checkpoint's form of pairs, on the CPU: {layer: {"A": A, "B": B}}."""
    return {name: {"A": a.cpu(), "B": b.cpu()} for name, (a, b) in pairs.items()}


def unnest_pairs(nested: Mapping[str, Mapping[str, Tensor]]) -> Pairs:
    """Inverse of `nest_pairs`."""
    return {name: (pair["A"], pair["B"]) for name, pair in nested.items()}


PEFT_A, PEFT_B = ".lora_A.weight", ".lora_B.weight"
"""The endings of peft's keys of a LoRA layer's factors."""


def peft_key(layer: str, factor: str) -> str:
    """peft's key of one factor ("A" or "B") of a layer: "blocks.0.attn.proj.lora_A.weight"."""
    return layer + (PEFT_A if factor == "A" else PEFT_B)


def peft_partner(key: str) -> str | None:
    """The key of the other factor of the pair a peft key belongs to; None for a key that is no LoRA factor."""
    if key.endswith(PEFT_A):
        return key[: -len(PEFT_A)] + PEFT_B
    if key.endswith(PEFT_B):
        return key[: -len(PEFT_B)] + PEFT_A
    return None


def unpack_peft(tensors: Mapping[str, Tensor]) -> tuple[Pairs, dict[str, Tensor]]:
    """(LoRA pairs by layer, the other tensors) of a peft state dict; a lone A or B is a ValueError naming the key."""
    layers = [key[: -len(PEFT_A)] for key in tensors if key.endswith(PEFT_A)]
    lora = {}
    for layer in layers:
        if layer + PEFT_B not in tensors:
            raise ValueError(f"array '{layer}{PEFT_A}' has no '{layer}{PEFT_B}' beside it: send both LoRA factors")
        lora[layer] = (tensors[layer + PEFT_A], tensors[layer + PEFT_B])
    paired = {peft_key(layer, factor) for layer in layers for factor in "AB"}
    lone = [key for key in tensors if key.endswith(PEFT_B) and key not in paired]
    if lone:
        raise ValueError(f"array '{lone[0]}' has no '{peft_partner(lone[0])}' beside it: send both factors")
    return lora, {key: tensor for key, tensor in tensors.items() if key not in paired}
