"""Fed-SB (Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in (Private)
Federated LoRA Fine-Tuning", arXiv 2502.15436), on LoRA-SB (Ponkshe et al., arXiv 2411.19557): the update of each
adapted layer is dW = s B0 R A0 (s = alpha / r), with A0 (r x in, orthonormal rows) and B0 (out x r) frozen and the
same on every client; only the r x r core R trains and travels. Averaging R by sample count is exact, as B0 and A0
are shared:

    sum p_k s B0 R_k A0 = s B0 R_bar A0,   R_bar = sum p_k R_k   (this round's R_k only)

The start is LoRA-SB's update approximation (`gradient_start`): the first full fine-tuning step of SGD, -lr G (G the
gradient of the loss at the frozen weight), cut to rank r by SVD, -lr G ~ U_r S_r V_r^T, with

    B0 = U_r,   A0 = V_r^T,   R0 = S_r / s,   so that s B0 R0 A0 is that truncated step.

In the checkpoint and transport layout the pair stays (A, B) = (R A0, B0): the clients train A only as R A0 (its core
R the trainable tensor, `ClientRule.core`), B is frozen, and the server averages A, which is R_bar A0. What travels
is R, r^2 numbers a layer each way: every client holds A0.

Clients of different ranks are refused: the start is one SVD at one rank. Under `lorafair flower` each node takes its
client's gradient and sends it to the server, which cuts the start from their sum, and every message carries A0 (the
messages hold A and B whole; the byte counts stay R's); `LoraStrategy`, which makes no such exchange, refuses Fed-SB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lorafair.aggregation.base import Aggregator, check_option, is_count
from lorafair.aggregation.rules import ClientRule
from lorafair.aggregation.updates import GroupResult, LayerGroup


@dataclass
class FedSB(Aggregator):
    init_batches: int = 4
    """Batches of its own data each client takes the gradient of the frozen weights on, once before round 1, for
    the start; the gradient the start is cut from is their sample-weighted mean."""

    name: ClassVar[str] = "fed_sb"
    display_name: ClassVar[str] = "Fed-SB"
    needs: ClassVar[str] = "averages"
    sums_only: ClassVar[bool] = True
    mixed_ranks: ClassVar[bool] = False
    starts_from_gradient: ClassVar[bool] = True
    global_model: ClassVar[str] = ("the starting backbone (with the averaged head) in base/ and, in the adapter, "
                                   "A = R A0 (the averaged core over the fixed orthonormal rows A0) and the fixed B0; "
                                   "the frozen weights never change.")

    def __post_init__(self) -> None:
        check_option(self.name, "init_batches", self.init_batches,
                     is_count(self.init_batches) and self.init_batches >= 1, "an integer >= 1")

    def client_rule(self, round_index: int) -> ClientRule:
        """Every round: train and upload the core R of A = R A0; B is frozen."""
        return ClientRule(trains="A", sends="A", core=True)

    def combine(self, group: LayerGroup) -> GroupResult:
        return GroupResult(lora=(group.A_bar, group.B_bar))


def gradient_start(gradient: Tensor, rank: int, scaling: float, lr: float) -> tuple[Tensor, Tensor, Tensor]:
    """(R0, A0, B0) of LoRA-SB's start from the `gradient` (out x in) of the loss at a frozen weight: the top-`rank`
    SVD of the first SGD step -lr G = U S V^T gives A0 = V_r^T (orthonormal rows), B0 = U_r and R0 = diag(S_r) /
    scaling, so that scaling * B0 @ R0 @ A0 is the best rank-r approximation of that step; in float64."""
    U, S, Vh = torch.linalg.svd(-lr * gradient.double(), full_matrices=False)
    return torch.diag(S[:rank] / scaling), Vh[:rank], U[:, :rank]


def core_of(A: Tensor, basis: Tensor) -> Tensor:
    """The r x r core R of A = R A0 over `basis` A0 (orthonormal rows): R = A A0^T, what a client uploads."""
    return A @ basis.T
