"""Between Flower's records and lorafair's tensors: one key format, peft's (`lorafair.keys.peft_key`).

A model's trainable state travels as one ArrayRecord keyed like `get_peft_model_state_dict`: a LoRA layer L is the
pair `L.lora_A.weight` (r x in) and `L.lora_B.weight` (out x r); every other key (a classifier head) is averaged.
Merges (FLoRA, FedEx-LoRA) travel in a second ArrayRecord keyed `{index}/L.lora_A.weight`, index counting the
merges of the run, so a client that missed rounds applies exactly the ones it has not seen, in order.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord
from torch import Tensor

from lorafair.keys import PEFT_A, Pairs, peft_key, unpack_peft


def arrays_to_state(arrays: ArrayRecord) -> tuple[Pairs, dict[str, Tensor]]:
    """(LoRA pairs by layer, the other tensors) of an ArrayRecord; a lone A or B is an error naming the key."""
    return unpack_peft(arrays.to_torch_state_dict())


def state_to_arrays(lora: Mapping[str, tuple[Tensor, Tensor]], extra: Mapping[str, Tensor],
                    order: list[str] | None = None) -> ArrayRecord:
    """The ArrayRecord of (lora, extra); `order` (the keys of the record they came from) fixes the key order."""
    tensors = {**{peft_key(layer, "A"): pair[0] for layer, pair in lora.items()},
               **{peft_key(layer, "B"): pair[1] for layer, pair in lora.items()}, **extra}
    keys = order if order is not None else list(tensors)
    return ArrayRecord(torch_state_dict={key: tensors[key].detach().cpu().contiguous() for key in keys})


def merges_to_arrays(merges: list[Pairs], start: int) -> ArrayRecord:
    """Merges number `start` onwards, keyed `{index}/{layer}.lora_A.weight`."""
    tensors = {}
    for index, merge in enumerate(merges[start:], start):
        for layer, (lora_a, lora_b) in merge.items():
            tensors[f"{index}/{peft_key(layer, 'A')}"] = lora_a.detach().cpu().contiguous()
            tensors[f"{index}/{peft_key(layer, 'B')}"] = lora_b.detach().cpu().contiguous()
    return ArrayRecord(torch_state_dict=tensors)


def merges_to_apply(merges: ArrayRecord | None, applied: int) -> list[Pairs]:
    """The merges a client has not applied yet (index >= `applied`), in order; each is layer -> (A_m, B_m) and the
    client adds scaling * B_m @ A_m to its frozen weight of that layer. A gap in the indices is an error."""
    tensors = merges.to_torch_state_dict() if merges is not None else {}
    by_index: dict[int, Pairs] = {}
    for key, lora_a in tensors.items():
        index, name = key.split("/", 1)
        if name.endswith(PEFT_A):
            layer = name[: -len(PEFT_A)]
            by_index.setdefault(int(index), {})[layer] = (lora_a, tensors[f"{index}/{peft_key(layer, 'B')}"])
    pending = sorted(index for index in by_index if index >= applied)
    if pending and pending != list(range(applied, applied + len(pending))):
        raise ValueError(f"merges {pending} do not continue from the {applied} this client has applied: a merge is "
                         "missing, so its frozen weights would drift from the server's")
    return [by_index[index] for index in pending]

