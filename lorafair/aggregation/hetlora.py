"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", arXiv
2401.06432): clients of different ranks. Each client's pair is zero-padded to the largest rank R (`ranks.to_server`:
B in the server's scaling), and the server averages the padded factors weighted by how large each client's update
is, the Frobenius norm of its product:

    w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F        A' = sum_k w_k A_k,   B' = sum_k w_k B_k

per layer; a rank-r client then starts from the leading r components of (A', B') in its own scaling (the default
`by_rank`). Every norm comes from r x r products (`lowrank.norm_sq`: ||B A||^2 = <B^T B, A A^T>), never from the
out x in product. A layer whose products are all zero falls back to the sample-count weights p_k.

The weights need each client's own norm, so the round keeps every client's factors (needs = "factors"). The extra
tensors (a classifier's head) are averaged by sample count, as every method averages them.

Rank self-pruning (off by default, `prune_gamma` 1): a rank-r client keeps k = max(1, floor(gamma r)) leading
components and adds to its training loss the penalty on the rest (the tail), summed over its adapted layers,

    lambda * sum_layers ||B[:, k:]||_F ||A[k:, :]||_F

and after training lowers its rank to k for good when the tail has shrunk, tail(trained) < threshold * tail(start),
uploading its leading k components (`pruned_rank`, `ranks.to_client`); the round loop keeps each client's rank
(under `lorafair flower` each node prunes its own update and announces its rank; `LoraStrategy` refuses pruning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lorafair.aggregation import cost, lowrank
from lorafair.aggregation.base import Aggregator, check_option
from lorafair.aggregation.ranks import Pair
from lorafair.aggregation.updates import GroupResult, LayerGroup


@dataclass
class HetLoRA(Aggregator):
    prune_gamma: float = 1.0
    """Rank self-pruning: a rank-r client keeps max(1, floor(prune_gamma * r)) leading components and may prune the
    rest (the paper's decay factor gamma, in (0, 1]; 1: no pruning, the clients keep their ranks)."""
    prune_penalty: float = 0.0
    """Rank self-pruning: the weight lambda of the penalty on the norm of the components a client may prune, added
    to its training loss (>= 0; needs prune_gamma below 1)."""
    prune_threshold: float = 1.0
    """Rank self-pruning: a client prunes when its tail norm after training is below this times the tail norm it
    started the round from (> 0; 1: whenever the tail shrank)."""

    name: ClassVar[str] = "hetlora"
    display_name: ClassVar[str] = "HetLoRA"
    needs: ClassVar[str] = "factors"
    global_model: ClassVar[str] = ("the starting backbone (with the averaged head) in base/ and, in the adapter, the "
                                   "clients' zero-padded factors averaged with weights proportional to the norm of "
                                   "each client's update, at the largest rank; the frozen weights never change.")

    def __post_init__(self) -> None:
        gamma, penalty, threshold = self.prune_gamma, self.prune_penalty, self.prune_threshold
        check_option(self.name, "prune_gamma", gamma, _is_real(gamma) and 0 < gamma <= 1, "a number in (0, 1]")
        check_option(self.name, "prune_penalty", penalty, _is_real(penalty) and penalty >= 0, "a finite number >= 0")
        check_option(self.name, "prune_threshold", threshold, _is_real(threshold) and threshold > 0,
                     "a finite number > 0")
        check_option(self.name, "prune_penalty", penalty, penalty == 0 or gamma < 1,
                     "0 while prune_gamma is 1, which leaves no components to penalise (lower prune_gamma or "
                     "drop prune_penalty)")

    @property
    def self_prunes(self) -> bool:
        """Only a gamma below 1 leaves components to prune."""
        return self.prune_gamma < 1

    def kept_rank(self, rank: int) -> int:
        """The leading components a rank-`rank` client keeps when it prunes: max(1, floor(gamma rank))."""
        return max(1, math.floor(self.prune_gamma * rank + 1e-9))

    def client_penalty(self, lora: Mapping[str, Pair]) -> Tensor | None:
        """lambda * sum over layers of ||B[:, k:]||_F ||A[k:, :]||_F of the client's live pairs (k = `kept_rank`);
        None where there is no penalty or no tail."""
        rank = next(iter(lora.values()))[0].shape[0]
        kept = self.kept_rank(rank)
        if self.prune_penalty == 0 or kept == rank:
            return None
        return self.prune_penalty * tail_norm(lora, kept)

    def pruned_rank(self, start: Mapping[str, Pair], trained: Mapping[str, Pair]) -> int:
        """`kept_rank` where the trained tail is below prune_threshold times the starting one, else the rank."""
        rank = next(iter(trained.values()))[0].shape[0]
        kept = self.kept_rank(rank)
        if kept < rank and tail_norm(trained, kept) < self.prune_threshold * tail_norm(start, kept):
            return kept
        return rank

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


def tail_norm(lora: Mapping[str, Pair], kept: int) -> Tensor:
    """sum over layers of ||B[:, kept:]||_F ||A[kept:, :]||_F: the size of the components past `kept`."""
    return sum(torch.linalg.matrix_norm(B[:, kept:]) * torch.linalg.matrix_norm(A[kept:])
               for A, B in lora.values())


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
