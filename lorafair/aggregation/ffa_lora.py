"""FFA-LoRA: A is shared and frozen for the whole run, so only B travels and averaging B is exact:
sum p_k B_k A = B_bar A."""

from __future__ import annotations

from typing import ClassVar

from lorafair.aggregation.base import Aggregator, GroupResult, LayerGroup


class FFALoRA(Aggregator):
    name: ClassVar[str] = "ffa_lora"
    display_name: ClassVar[str] = "FFA-LoRA"
    sends_A: ClassVar[bool] = False

    def combine(self, group: LayerGroup) -> GroupResult:
        same = (group.A[:, :1] == group.A).flatten(2).all(-1)
        if not bool(same.all()):
            layer, client = (~same).nonzero()[0].tolist()
            raise ValueError(f"ffa_lora: client {client} sent a different A than client 0 for layer "
                             f"'{group.names[layer]}'; FFA-LoRA needs one frozen A shared by all clients "
                             "(initialise A from the same seed everywhere and never train it)")
        return GroupResult(lora=(group.A[:, 0].clone(), group.B_bar))  # a copy: a view would keep all K A's alive
