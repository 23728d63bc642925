"""FedEx-LoRA: clients restart from the averages (A_bar, B_bar), and the residual
sum p_k B_k A_k - B_bar A_bar is merged into every client's frozen weight, so the model update is exact.

The residual is low rank: [p_1 B_1 ... p_K B_K, B_bar] @ [A_1; ...; A_K; -A_bar], so it travels as factors of
rank (K + 1) r rather than as a dense out x in matrix. Sending them keeps every client's factors on the server
(needs = "factors"), like FLoRA.

Mixed ranks: the averages are those of the clients' pairs zero-padded to the global rank R (in the server's scaling,
see `ranks`) and the residual is exact for the global model. A rank-r client restarts from the leading r
components of (A_bar, B_bar), so its model lacks the tail s_R B_bar[:, r:] A_bar[r:] of the global one: exactly the
part its rank cannot hold, the same truncation as every other method's. The padding components of lower-rank
clients are dropped from the residual's factors.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.updates import GroupResult, LayerGroup


class FedExLoRA(Aggregator):
    name: ClassVar[str] = "fedex_lora"
    display_name: ClassVar[str] = "FedEx-LoRA"
    needs: ClassVar[str] = "factors"
    merges: ClassVar[bool] = True
    global_model: ClassVar[str] = ("FedEx-LoRA merges each round's residual (ideal update minus the averaged product) "
                                   "into the frozen weights: base/ holds those merges, the adapter the averaged "
                                   "factors.")

    def combine(self, group: LayerGroup) -> GroupResult:
        A_stack, B_stack = group.client_stacks(weighted="B")
        residual_A = torch.cat([A_stack, -group.A_bar], dim=-2)
        residual_B = torch.cat([B_stack, group.B_bar], dim=-1)
        return GroupResult(lora=(group.A_bar, group.B_bar), merge=(residual_A, residual_B))
