"""FFA-LoRA: A is shared and frozen for the whole run, so only B travels and averaging B is exact:
sum p_k B_k A = B_bar A. The round needs only the weighted sum of B (needs = "averages"); A is the template's,
which every client's must equal bit for bit.

Mixed ranks: the frozen A is the global rank's; a rank-r client trains with its leading r rows (`ranks.to_client`),
and its B is read in the server's scaling (B * R / r, zero-padded), so B_bar A stays exact."""

from __future__ import annotations

from typing import ClassVar

import torch

from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.updates import ClientUpdate, GroupResult, LayerGroup


class FFALoRA(Aggregator):
    name: ClassVar[str] = "ffa_lora"
    display_name: ClassVar[str] = "FFA-LoRA"
    sends_A: ClassVar[bool] = False
    needs: ClassVar[str] = "averages"
    sums_only: ClassVar[bool] = True

    def check_update(self, index: int, update: ClientUpdate, first: ClientUpdate) -> str | None:
        for name, (A, _) in update.lora.items():
            if not torch.equal(A, first.lora[name][0][: A.shape[0]]):
                return (f"ffa_lora: client {index} sent a different A than client 0 for layer '{name}'; FFA-LoRA "
                        "needs one frozen A shared by all clients (initialise A from the same seed everywhere and "
                        "never train it)")
        return None

    def combine(self, group: LayerGroup) -> GroupResult:
        return GroupResult(lora=(group.A_bar, group.B_bar))
