"""FLoRA: stacking. merge = (A_stack, B_stack) with A_stack = [p_1 A_1; ...; p_K A_K] and
B_stack = [B_1 ... B_K], so B_stack @ A_stack = sum p_k B_k A_k exactly. Every client adds that product to its
frozen weight and re-initialises its LoRA, hence lora is None. The download holds K r ranks: it grows with K.
"""

from __future__ import annotations

from typing import ClassVar

from lorafair.aggregation.base import Aggregator, GroupResult, LayerGroup


class FLoRA(Aggregator):
    name: ClassVar[str] = "flora"
    display_name: ClassVar[str] = "FLoRA"

    def combine(self, group: LayerGroup) -> GroupResult:
        layers, clients, rank, fan_in = group.A.shape
        A_stack = (group.A * group.weights.view(1, -1, 1, 1)).reshape(layers, clients * rank, fan_in)
        B_stack = group.B.permute(0, 2, 1, 3).reshape(layers, -1, clients * rank)
        return GroupResult(merge=(A_stack, B_stack))
