"""FFA-LoRA: A is shared and frozen for the whole run, so only B travels and averaging B is exact:
sum p_k B_k A = B_bar A. The round needs only the weighted sum of B (needs = "averages"); A is the template's,
which every client's must equal bit for bit (its client rule freezes A: `Aggregator.refusal` checks it).

Mixed ranks: the frozen A is the global rank's; a rank-r client trains with its leading r rows (`ranks.to_client`),
and its B is read in the server's scaling (B * R / r, zero-padded), so B_bar A stays exact."""

from __future__ import annotations

from typing import ClassVar

from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.rules import ClientRule
from lorafair.aggregation.updates import GroupResult, LayerGroup


class FFALoRA(Aggregator):
    name: ClassVar[str] = "ffa_lora"
    display_name: ClassVar[str] = "FFA-LoRA"
    needs: ClassVar[str] = "averages"
    sums_only: ClassVar[bool] = True

    def client_rule(self, round_index: int) -> ClientRule:
        """Every round: train and upload B only; A stays at its shared seeded initial value."""
        return ClientRule(trains="B", sends="B")

    def combine(self, group: LayerGroup) -> GroupResult:
        return GroupResult(lora=(group.A_bar, group.B_bar))
