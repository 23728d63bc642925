"""Products of LoRA factors measured without forming them.

Every function takes factors batched over leading dimensions (layers): B is [..., out, r] and A is [..., r, in],
so B @ A would be out x in. Each works through r x r (or K r x K r) matrices instead, which costs
O((out + in) r^2) rather than O(out in r) and never holds an out x in matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-8
"""Floor of a norm in a cosine, as in torch.nn.functional.cosine_similarity."""


def inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """<B1 A1, B2 A2>_F = <B1^T B2, A1 A2^T>_F."""
    return ((B1.mT @ B2) * (A1 @ A2.mT)).sum((-2, -1))


def norm_sq(B: Tensor, A: Tensor) -> Tensor:
    """||B A||_F^2."""
    return inner(B, A, B, A)


def column_inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """[..., in]: column j of B1 A1 dotted with column j of B2 A2, i.e. the diagonal of A1^T (B1^T B2) A2."""
    return (((B1.mT @ B2) @ A2) * A1).sum(-2)


def column_norms_sq(B: Tensor, A: Tensor) -> Tensor:
    """[..., in]: squared norm of every column of B A."""
    return column_inner(B, A, B, A)


def clamped_norm(squared: Tensor) -> Tensor:
    """max(sqrt(squared), EPS): the norm floor of a cosine; rounding may leave a Gram-form square slightly < 0."""
    return squared.clamp_min(EPS**2).sqrt()


def cosine_from_parts(inner_xy: Tensor, norm_sq_x: Tensor, norm_sq_y: Tensor) -> Tensor:
    """cos(x, y) from <x, y>, ||x||^2 and ||y||^2."""
    return inner_xy / (clamped_norm(norm_sq_x) * clamped_norm(norm_sq_y))


def truncated_svd(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top `rank` singular triplets (U, S, Vh) of B @ A, from QR of both factors and an SVD of the small core.

    B @ A = Q_B (R_B R_A^T) Q_A^T with orthonormal Q's, so the SVD of the core R_B R_A^T, rotated by Q_B and Q_A,
    is the SVD of the product. When the product has fewer than `rank` singular values (rank > min(out, in)),
    the missing ones are zero.
    """
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.mT)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
    kept = min(rank, S.shape[-1])
    U, S, Vh = Q_B @ U[..., :kept], S[..., :kept], Vh[..., :kept, :] @ Q_A.mT
    missing = rank - kept
    if missing:
        U = torch.cat([U, U.new_zeros(*U.shape[:-1], missing)], dim=-1)
        S = torch.cat([S, S.new_zeros(*S.shape[:-1], missing)], dim=-1)
        Vh = torch.cat([Vh, Vh.new_zeros(*Vh.shape[:-2], missing, Vh.shape[-1])], dim=-2)
    return U, S, Vh
