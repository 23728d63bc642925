"""FlexLoRA: the best rank-r approximation (Eckart-Young) of the ideal update sum p_k B_k A_k, with
A = V_r^T and B = U_r S_r (all singular values in B).

Below the crossover the SVD comes from QR of the stacked factors and an SVD of the K r x K r core
(lowrank.truncated_svd), never from the out x in product; above it, from the eigenvectors of the smaller Gram
matrix of the dense dW (ideal.DenseIdeal).
"""

from __future__ import annotations

from typing import ClassVar

from lorafair.aggregation import cost
from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.updates import GroupResult, LayerGroup


class FlexLoRA(Aggregator):
    name: ClassVar[str] = "flexlora"
    display_name: ClassVar[str] = "FlexLoRA"

    def ideal_use(self) -> cost.IdealUse:
        return cost.IdealUse(products=1, svd=True)

    def combine(self, group: LayerGroup) -> GroupResult:
        A, B = group.ideal.best_approximation(group.rank)
        return GroupResult(lora=(A, B), metrics={"cos": group.cosine_to_ideal(B, A)})
