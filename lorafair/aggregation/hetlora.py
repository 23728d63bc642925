"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", arXiv
2401.06432): clients of different ranks. Each client's pair is zero-padded to the largest rank R (`ranks.to_server`:
B in the server's scaling), and the server averages the padded factors weighted by how large each client's update
is, the Frobenius norm of its product:

    w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F        A' = sum_k w_k A_k,   B' = sum_k w_k B_k

per layer; a rank-r client then starts from the leading r components of (A', B') in its own scaling (the default
`by_rank`). Every norm comes from r x r products (`lowrank.norm_sq`: ||B A||^2 = <B^T B, A A^T>), never from the
out x in product. A layer whose products are all zero falls back to the sample-count weights p_k.

The weights need each client's own norm, so the round keeps every client's factors (needs = "factors"). The extra
tensors (a classifier's head) are averaged by sample count, as every method averages them. The paper's rank
self-pruning on the clients is not implemented (see docs/client-methods.md).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lorafair.aggregation import cost, lowrank
from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.updates import GroupResult, LayerGroup


class HetLoRA(Aggregator):
    name: ClassVar[str] = "hetlora"
    display_name: ClassVar[str] = "HetLoRA"
    needs: ClassVar[str] = "factors"
    global_model: ClassVar[str] = ("the starting backbone (with the averaged head) in base/ and, in the adapter, the "
                                   "clients' zero-padded factors averaged with weights proportional to the norm of "
                                   "each client's update, at the largest rank; the frozen weights never change.")

    def ideal_use(self) -> cost.IdealUse:
        return cost.IdealUse(products=1)

    def combine(self, group: LayerGroup) -> GroupResult:
        weights = norm_weights(group)
        A = torch.einsum("lk,lkri->lri", weights, group.A)
        B = torch.einsum("lk,lokr->lor", weights, group.B)
        return GroupResult(lora=(A, B), metrics={"cos": group.cosine_to_ideal(B, A)})


def norm_weights(group: LayerGroup) -> torch.Tensor:
    """[L, K]: each client's ||B_k A_k||_F (its padded pair, in the server's scaling) over their sum per layer; the
    sample-count weights where every product of a layer is zero."""
    norms = lowrank.norm_sq(group.B.movedim(-2, 1), group.A).clamp_min(0).sqrt()
    total = norms.sum(-1, keepdim=True)
    return torch.where(total > 0, norms / total, group.weights)
