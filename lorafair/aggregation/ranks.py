"""Clients of different LoRA ranks: the one scaling convention, in one place.

A client of rank r trains LoRA with peft's scaling s_r = alpha / r, so the update it means is s_r B A. The server
works at the global rank R (the largest, the template's) and its scaling s_R = alpha / R:

- up: a rank-r pair is read as the rank-R pair (A with R - r zero rows below, B * R / r with R - r zero columns
  after), whose product times s_R is the client's update exactly. Every method then sees one rank, and the ideal
  update s_R dW = sum_k p_k s_k B_k A_k whatever the clients' ranks.
- down: a rank-r client starts from the leading r components of a rank-R pair, B * r / R, so that its product
  times its own s_r is exactly the server's truncated pair times s_R.

alpha cancels in both ratios, so the server never needs it. At r = R both maps return their input unchanged, so
rounds where every client has the global rank give the same numbers as before, bit for bit.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

Pair = tuple[Tensor, Tensor]


def scaling(alpha: float, rank: int) -> float:
    """peft's scaling s_r = alpha / r: a rank-r pair (A, B) means the update s_r B A."""
    return alpha / rank


def rescaled(B: Tensor, rank: int, to_rank: int) -> Tensor:
    """B of a rank-`rank` pair in the scaling of rank `to_rank`, so that s_to B' A = s_rank B A: B * to_rank / rank
    (alpha cancels)."""
    return B * (to_rank / rank)


def to_server(pair: Pair, rank: int) -> Pair:
    """A client's (A, B) of any rank r <= rank, as the rank-`rank` pair that means the same update."""
    A, B = pair
    own = A.shape[-2]
    if own == rank:
        return pair
    return F.pad(A, (0, 0, 0, rank - own)), F.pad(rescaled(B, own, rank), (0, rank - own))


def to_client(pair: Pair, rank: int) -> Pair:
    """The starting pair of a rank-`rank` client: the leading components of a server pair, in its own scaling."""
    A, B = pair
    global_rank = A.shape[-2]
    if rank == global_rank:
        return pair
    return A[..., :rank, :], rescaled(B[..., :rank], global_rank, rank)


def leading(pair: Pair, rank: int) -> Pair:
    """The leading `rank` components of a server pair, zero beyond, still at the server's rank and scaling."""
    A, B = pair
    A_kept, B_kept = A.clone(), B.clone()
    A_kept[..., rank:, :] = 0
    B_kept[..., rank:] = 0
    return A_kept, B_kept
