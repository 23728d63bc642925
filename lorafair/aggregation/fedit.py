"""FedIT: the weighted averages A_bar = sum p_k A_k and B_bar = sum p_k B_k (FedAvg on the LoRA factors).

B_bar @ A_bar differs from the ideal update sum p_k B_k A_k; the metric cos_avg measures by how much.
"""

from __future__ import annotations

from typing import ClassVar

from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.updates import GroupResult, LayerGroup


class FedIT(Aggregator):
    name: ClassVar[str] = "fedit"
    display_name: ClassVar[str] = "FedIT"
    sums_only: ClassVar[bool] = True

    def combine(self, group: LayerGroup) -> GroupResult:
        return GroupResult(lora=(group.A_bar, group.B_bar))
