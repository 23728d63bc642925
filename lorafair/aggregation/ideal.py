"""The ideal update dW = sum_k p_k B_k A_k of a layer group, held factored or dense, and the few products every
method needs from it.

Factored: dW = B_stack @ A_stack is never formed; its norm goes through K r x K r Gram matrices, which cost
O((out + in) (K r)^2). Dense: dW itself, [L, out, in], folded in for O(K r out in) as the clients arrive. Which one
a layer group uses is the cost model's choice (`cost.cheaper_path`); both give the same numbers up to float
rounding. Every tensor is batched over the group's L layers.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from lorafair.aggregation import lowrank


class FactoredIdeal:
    """dW = B @ A with B [L, out, K r] (the client weights ride on B) and A [L, K r, in]."""

    def __init__(self, B: Tensor, A: Tensor) -> None:
        self.B, self.A = B, A

    @cached_property
    def norm_sq(self) -> Tensor:
        """||dW||_F^2 per layer."""
        return lowrank.norm_sq(self.B, self.A)

    def inner(self, B: Tensor, A: Tensor) -> Tensor:
        """<dW, B @ A>_F per layer."""
        return lowrank.inner(B, A, self.B, self.A)

    def times(self, X: Tensor) -> Tensor:
        """dW @ X for X [L, in, c]."""
        return self.B @ (self.A @ X)

    def transposed_times(self, Y: Tensor) -> Tensor:
        """dW^T @ Y for Y [L, out, c]."""
        return self.A.mT @ (self.B.mT @ Y)

    def column_norms_sq(self) -> Tensor:
        """[L, in]: squared norm of every column of dW."""
        return lowrank.column_norms_sq(self.B, self.A)

    def best_approximation(self, rank: int) -> tuple[Tensor, Tensor]:
        """(A, B) = (V_r^T, U_r S_r), the best rank-r pair (Eckart-Young), from QR of both stacks."""
        U, S, Vh = lowrank.truncated_svd(self.B, self.A, rank)
        return Vh, U * S.unsqueeze(-2)


class DenseIdeal:
    """dW itself, [L, out, in]."""

    def __init__(self, dW: Tensor) -> None:
        self.dW = dW

    @cached_property
    def norm_sq(self) -> Tensor:
        return self.dW.square().sum((-2, -1))

    def inner(self, B: Tensor, A: Tensor) -> Tensor:
        return ((B.mT @ self.dW) * A).sum((-2, -1))

    def times(self, X: Tensor) -> Tensor:
        return self.dW @ X

    def transposed_times(self, Y: Tensor) -> Tensor:
        return self.dW.mT @ Y

    def column_norms_sq(self) -> Tensor:
        return self.dW.square().sum(-2)

    def best_approximation(self, rank: int) -> tuple[Tensor, Tensor]:
        """(A, B) = (V_r^T, U_r S_r) from the eigenvectors of the smaller Gram matrix (dW dW^T or dW^T dW).

        Only the top-r subspace comes from the Gram matrix, whose eigh costs a fraction of a full SVD; A is then
        orthonormalised by QR and B = dW A^T, so the singular values are read off dW itself, not squared."""
        fan_out, fan_in = self.dW.shape[-2:]
        kept = min(rank, fan_out, fan_in)
        if fan_out <= fan_in:
            U = torch.linalg.eigh(self.dW @ self.dW.mT).eigenvectors.flip(-1)[..., :kept]
            A = torch.linalg.qr((U.mT @ self.dW).mT).Q.mT
        else:
            A = torch.linalg.eigh(self.dW.mT @ self.dW).eigenvectors.flip(-1)[..., :kept].mT
        B = self.dW @ A.mT
        missing = rank - kept
        if missing:
            A = torch.cat([A, A.new_zeros(*A.shape[:-2], missing, fan_in)], dim=-2)
            B = torch.cat([B, B.new_zeros(*B.shape[:-1], missing)], dim=-1)
        return A, B


Ideal = FactoredIdeal | DenseIdeal
