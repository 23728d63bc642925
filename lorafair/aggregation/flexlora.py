"""FlexLoRA: the best rank-r approximation (Eckart-Young) of the ideal update sum p_k B_k A_k, with
A = V_r^T and B = U_r S_r (all singular values in B).

The SVD comes from QR of the stacked factors and an SVD of the K r x K r core (lowrank.truncated_svd), never from
the out x in product.
"""

from __future__ import annotations

from typing import ClassVar

from lorafair.aggregation import lowrank
from lorafair.aggregation.base import Aggregator, GroupResult, LayerGroup


class FlexLoRA(Aggregator):
    name: ClassVar[str] = "flexlora"
    display_name: ClassVar[str] = "FlexLoRA"

    def combine(self, group: LayerGroup) -> GroupResult:
        U, S, Vh = lowrank.truncated_svd(group.B_stack, group.A_stack, group.rank)
        A, B = Vh, U * S.unsqueeze(-2)
        return GroupResult(lora=(A, B), metrics={"cos": group.cosine_to_ideal(B, A)})
