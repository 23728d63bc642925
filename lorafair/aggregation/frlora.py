"""FRLoRA (Yan et al., "Federated Residual Low-Rank Adaption of Large Language Models", ICLR 2025,
https://openreview.net/forum?id=e0rQRMUhs7): LoRA starts from the top-r SVD of each frozen weight W0,

    W0 = U S V^T:   B0 = U_r sqrt(S_r / s),   A0 = sqrt(S_r / s) V_r^T   (s = alpha / r),   W <- W0 - s B0 A0

so the starting model is W0 exactly (`svd_start`; the round loop does it once, before round 1, when a method
`starts_from_weights`). Every round every client trains A and B from (A0, B0); the server averages both,
A_bar = sum p_k A_k and B_bar = sum p_k B_k, adds the change of the averaged product to the frozen weight,

    W <- W + s (B_bar A_bar - B0 A0)

and every client restarts from (A0, B0). The merge travels as factors of rank 2r, [B_bar, B0] @ [A_bar; -A0], never
as an out x in matrix; it needs only the weighted sums of A and B (secure aggregation could carry it).

Clients of different ranks are refused: the start is the SVD at one rank. Under `lorafair flower` the start reaches
each node as the run's first merge, (A0, -B0) of rank r, never as dense weights; `LoraStrategy`, which makes no start,
refuses FRLoRA.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.updates import GroupResult, LayerGroup


class FRLoRA(Aggregator):
    name: ClassVar[str] = "frlora"
    display_name: ClassVar[str] = "FRLoRA"
    sums_only: ClassVar[bool] = True
    merges: ClassVar[bool] = True
    mixed_ranks: ClassVar[bool] = False
    starts_from_weights: ClassVar[bool] = True
    global_model: ClassVar[str] = ("FRLoRA takes the top-r SVD of each frozen weight out of it at the start and merges "
                                   "each round's change of the averaged product into it: base/ holds that residual "
                                   "weight with the merges, the adapter the fixed SVD start (A0, B0), and their sum "
                                   "is the trained model.")

    def downloads(self, round_index: int) -> str:
        """No factor: clients restart from (A0, B0), which they hold; only the merge travels down."""
        return ""

    def combine(self, group: LayerGroup) -> GroupResult:
        A0, B0 = group.template
        merge = (torch.cat([group.A_bar, -A0], dim=-2), torch.cat([group.B_bar, B0], dim=-1))
        return GroupResult(lora=(A0, B0), merge=merge)


def svd_start(weight: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    """(A0, B0) = (sqrt(S_r / s) V_r^T, U_r sqrt(S_r / s)) of the top-`rank` SVD of a frozen `weight` (out x in), so
    that scaling * B0 @ A0 is its best rank-r approximation, the singular values shared evenly by both factors; in
    float64 (the SVD of the dense weight, once per run)."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = (S[:rank] / scaling).sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root
