"""Between Flower's records and lorafair's tensors: one key format, peft's (`lorafair.keys.peft_key`).

A model's trainable state travels as one ArrayRecord keyed like `get_peft_model_state_dict`: a LoRA layer L is the
pair `L.lora_A.weight` (r x in) and `L.lora_B.weight` (out x r); every other key (a classifier head) is averaged.
Merges (FLoRA, FedEx-LoRA) travel in a second ArrayRecord keyed `{index}/L.lora_A.weight`, index counting the
merges of the run, so a client that missed rounds applies exactly the ones it has not seen, in order.

The round's client rule (`lorafair.aggregation.ClientRule`: the factors clients train, upload and keep) travels in
the message's ConfigRecord (`rule_to_config`), so a client trains what the server folds (RoLoRA: B in odd rounds, A
in even ones) and the settings of the local adapter clients train besides (FedDPA); where clients keep tensors of their
own (FedSA-LoRA: B; FedDPA: its local adapter), the config also names the last round whose update of this node the
server kept (`KEPT_ROUND`), so a node whose update was dropped goes back to what it held.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import astuple

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from lorafair.aggregation import ClientRule, LocalAdapter
from lorafair.keys import PEFT_A, Pairs, peft_key, unpack_peft

TRAINS, SENDS, KEEPS, KEEPS_EXTRA = "lorafair.trains", "lorafair.sends", "lorafair.keeps", "lorafair.keeps-extra"
"""ConfigRecord keys of the round's client rule: the factors ("A", "B", "AB" or "") clients train, upload and keep,
and whether they keep their extra tensors (head)."""
LOCAL_SETTINGS = ("lorafair.local-shared-weight", "lorafair.local-similarity-scale", "lorafair.local-instances")
"""ConfigRecord keys, where clients train a local adapter (`LocalAdapter`, FedDPA): its settings, in its fields'
order; absent where they train none."""
KEPT_ROUND = "lorafair.kept-round"
"""ConfigRecord key, where clients keep tensors of their own: the last round whose update of this node the server kept
(0: none)."""


def rule_to_config(rule: ClientRule) -> dict[str, str | bool | float | int]:
    """The ConfigRecord entries of a round's client rule (with its local adapter's settings, where it gives one)."""
    local = {} if rule.local is None else dict(zip(LOCAL_SETTINGS, astuple(rule.local), strict=True))
    return {TRAINS: rule.trains, SENDS: rule.sends, KEEPS: rule.keeps, KEEPS_EXTRA: rule.keeps_extra, **local}


def rule_of_config(config: ConfigRecord) -> ClientRule:
    """The client rule a message's config carries; a config without one means the default rule (train and upload
    both factors, keep nothing), as for a message of a server that does not send rules."""
    local = None
    if LOCAL_SETTINGS[0] in config:
        shared_weight, similarity_scale, instances = (config[key] for key in LOCAL_SETTINGS)
        local = LocalAdapter(float(shared_weight), float(similarity_scale), int(instances))
    return ClientRule(trains=str(config.get(TRAINS, "AB")), sends=str(config.get(SENDS, "AB")),
                      keeps=str(config.get(KEEPS, "")), keeps_extra=bool(config.get(KEEPS_EXTRA, False)), local=local)


OWN, PENDING, PENDING_ROUND = "lorafair.own", "lorafair.pending", "lorafair.pending-round"
"""Node state records: what the node keeps of its own, what it trained in its last round (until the server says
whether it kept that update) and that round."""


def own_tensors(state: RecordDict, config: ConfigRecord, initial: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """What a node keeps of its own for the message whose `config` it got: what it trained in its last round if the
    server kept that update (`KEPT_ROUND`), else what it held before, else (before it first trained) `initial`.
    Settles its node `state` accordingly."""
    if PENDING in state:
        if int(state[PENDING_ROUND]["round"]) == int(config.get(KEPT_ROUND, 0)):
            state[OWN] = state[PENDING]
        del state[PENDING], state[PENDING_ROUND]
    if OWN in state:
        return state[OWN].to_torch_state_dict()
    return {key: tensor.detach().clone() for key, tensor in initial.items()}


def hold_pending(state: RecordDict, round_index: int, tensors: Mapping[str, Tensor]) -> None:
    """Keep what a node trained in round `round_index` and keeps of its own, until the server says whether it kept
    the node's update (`own_tensors`)."""
    state[PENDING] = ArrayRecord(torch_state_dict={key: tensor.detach().cpu().clone() for key, tensor in
                                                   tensors.items()})
    state[PENDING_ROUND] = ConfigRecord({"round": round_index})


def rule_keys(rule_factors: str, layers: list[str]) -> list[str]:
    """The peft keys of the given factors ("A", "B" or "AB") of `layers`."""
    return [peft_key(layer, factor) for layer in layers for factor in rule_factors]


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

