"""FLoRA: stacking. merge = (A_stack, B_stack) with A_stack = [p_1 A_1; ...; p_K A_K] and
B_stack = [B_1 ... B_K], so B_stack @ A_stack = sum p_k B_k A_k exactly. Every client adds that product to its
frozen weight and re-initialises its LoRA, hence lora is None. The download holds K r ranks: it grows with K,
and so does the server's memory, which keeps every client's factors to send them (needs = "factors").

Mixed ranks: each client's pair arrives padded to the global rank in the server's scaling (`ranks`), so the stack
is exact at any ranks; the padding is dropped, so the download holds sum_k r_k components. Every client then
re-initialises LoRA at its own rank.
"""

from __future__ import annotations

from typing import ClassVar

from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.updates import GroupResult, LayerGroup


class FLoRA(Aggregator):
    name: ClassVar[str] = "flora"
    display_name: ClassVar[str] = "FLoRA"
    needs: ClassVar[str] = "factors"
    merges: ClassVar[bool] = True
    global_model: ClassVar[str] = ("FLoRA merges every round's stacked client update into the frozen weights and "
                                   "restarts LoRA, so the adapter is empty (B = 0): everything learnt sits in base/ "
                                   "and in the merged model.")

    def combine(self, group: LayerGroup) -> GroupResult:
        return GroupResult(merge=group.client_stacks(weighted="A"))
