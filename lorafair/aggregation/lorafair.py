"""LoRA-FAIR (seed paper, Eq. 8): keep the averaged A_bar and send B' = B_bar + dB, where dB minimises

    1 - S(dW, (B_bar + dB) A_bar) + lam ||dB||_F^2,        dW = sum p_k B_k A_k,

so that B' A_bar points like the ideal update while B' stays close to the B_bar every client agrees on.

S is one of three objectives:
- "cosine": cosine of the whole matrices, as the paper writes Eq. 8;
- "column_cosine": cosine of each column (over the `in` index) averaged, as the public code computes it with
  F.cosine_similarity(dW, X, dim=0).mean();
- "frobenius": least squares, min ||(B_bar + dB) A_bar - dW||^2 + lam ||dB||^2, in closed form
  dB = (C - B_bar G)(G + lam I)^-1.
The cosine objectives run `steps` of plain SGD with rate `lr` (as the paper) from dB = 0 ("zero": B' starts at the
average, the natural reading of "keep B close to B_bar") or from a seeded Xavier-uniform draw ("xavier", as the
public code). residual_on="A" is the paper's Table 3 ablation: keep B_bar and correct A_bar instead.

How it stays cheap: write the corrected factor in "tall" form X (B' itself, out x r; or A'^T, in x r) and the fixed
one as F (A_bar; or B_bar^T). Then, with C = dW F^T and G = F F^T, both computed once from the stacked factors,
    <X F, dW> = <X, C>     and     ||X F||^2 = <X^T X, G>,
and no out x in matrix is ever built. Per SGD step this costs O(r^3) for the whole-matrix cosine (which moves
only r x r coefficients, see `_matrix_cosine_sgd`) and O((out + in) K r^2) for the column cosine, instead of
O(out in r) for the dense SGD. Gradients are analytic (the tests check them against autograd SGD on the dense
matrices), so aggregation also works under torch.no_grad or inference_mode; all layers of one shape step together.

Step size: the cosine's curvature grows like 1 / ||B' A_bar||^2, so SGD at a fixed lr takes large steps when the
factors are tiny (||B_bar A_bar|| well below sqrt(lr)); rounding alone can then move B' even where B_bar A_bar
already equals dW. The frobenius objective has no step size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafair.aggregation import lowrank
from lorafair.aggregation.base import (
    Aggregator,
    GroupResult,
    LayerGroup,
    check_option,
    is_count,
    is_finite_number,
)

OBJECTIVES = ("cosine", "column_cosine", "frobenius")
INITS = ("zero", "xavier")
RESIDUAL_ON = ("B", "A")

SimilarityGradient = Callable[[Tensor], Tensor]
"""X -> dS/dX for a batch of corrected factors in tall form."""


@dataclass
class LoRAFAIR(Aggregator):
    lam: float = 0.01
    """Weight of lam ||dB||_F^2, which keeps B' near B_bar (paper: 0.01; 0 was its worst setting)."""
    objective: str = "cosine"
    """cosine, column_cosine or frobenius (see the module docstring)."""
    steps: int = 500
    """SGD steps for the cosine objectives."""
    lr: float = 0.01
    """SGD learning rate for the cosine objectives."""
    init: str = "zero"
    """Start of dB for SGD: zero, or xavier (uniform, drawn from a generator seeded with `seed`)."""
    seed: int = 0
    """Seed of the xavier start; each aggregate() call draws the next values, so a run is reproducible."""
    residual_on: str = "B"
    """Which averaged factor receives the correction: B (the method) or A (the paper's ablation)."""

    name: ClassVar[str] = "lorafair"
    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_option(self.name, "lam", self.lam, is_finite_number(self.lam) and self.lam >= 0, "a number >= 0")
        check_option(self.name, "objective", self.objective, self.objective in OBJECTIVES, f"one of {OBJECTIVES}")
        check_option(self.name, "steps", self.steps, is_count(self.steps), "an integer >= 0")
        check_option(self.name, "lr", self.lr, is_finite_number(self.lr) and self.lr > 0, "a number > 0")
        check_option(self.name, "init", self.init, self.init in INITS, f"one of {INITS}")
        check_option(self.name, "seed", self.seed, is_count(self.seed), "an integer >= 0")
        check_option(self.name, "residual_on", self.residual_on, self.residual_on in RESIDUAL_ON,
                     f"one of {RESIDUAL_ON}")
        if self.objective != "frobenius":
            # Each step scales dB by (1 - 2 lr lam) before the similarity pulls it: beyond lr lam = 1 it diverges.
            check_option(self.name, "lam", self.lam, self.lr * self.lam < 1,
                         f"below 1 / lr = {1 / self.lr:g} for SGD to converge (or lower lr)")
        self._generator = torch.Generator().manual_seed(self.seed)

    def combine(self, group: LayerGroup) -> GroupResult:
        if self.residual_on == "B":
            start, fixed = group.B_bar, group.A_bar
            C = group.B_stack @ (group.A_stack @ fixed.mT)
        else:
            start, fixed = group.A_bar.mT, group.B_bar.mT
            C = group.A_stack.mT @ (group.B_stack.mT @ group.B_bar)
        G = fixed @ fixed.mT
        if self.objective == "frobenius":
            ridge = G + self.lam * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
            correction = (C - start @ G) @ torch.linalg.pinv(ridge, hermitian=True)
        elif self.objective == "cosine":
            ideal_norm = lowrank.clamped_norm(group.ideal_norm_sq)[:, None, None]
            correction = self._matrix_cosine_sgd(start, self._initial_correction(start), C, G, ideal_norm)
        else:
            column_norms = lowrank.clamped_norm(lowrank.column_norms_sq(group.B_stack, group.A_stack))
            gradient = (_row_cosine_gradient(C, G, column_norms[:, :, None]) if self.residual_on == "A"
                        else _column_cosine_gradient(group, column_norms[:, None, :]))
            correction = self._sgd(start, self._initial_correction(start), gradient)
        corrected = start + correction
        A, B = (group.A_bar, corrected) if self.residual_on == "B" else (corrected.mT, group.B_bar)
        return GroupResult(lora=(A, B), metrics={
            "cos": group.cosine_to_ideal(B, A),
            "cos_factor": F.cosine_similarity(start.flatten(1), corrected.flatten(1), dim=1, eps=lowrank.EPS),
        })

    def _initial_correction(self, start: Tensor) -> Tensor:
        if self.init == "zero":
            return torch.zeros_like(start)
        bound = math.sqrt(6.0 / (start.shape[-2] + start.shape[-1]))  # xavier_uniform_ of each correction matrix
        draw = torch.rand(start.shape, generator=self._generator, dtype=start.dtype)
        return ((2 * draw - 1) * bound).to(start.device)

    def _sgd(self, start: Tensor, correction: Tensor, similarity_gradient: SimilarityGradient) -> Tensor:
        """Plain SGD on 1 - S(start + d) + lam ||d||^2, as torch.optim.SGD would step it."""
        for _ in range(self.steps):
            gradient = 2 * self.lam * correction - similarity_gradient(start + correction)
            correction = correction - self.lr * gradient
        return correction

    def _matrix_cosine_sgd(self, start: Tensor, correction: Tensor, C: Tensor, G: Tensor,
                           ideal_norm: Tensor) -> Tensor:
        """The same SGD for the whole-matrix cosine, in coefficient form: O(r^3) per step instead of O(m r^2).

        The gradient of S = <X, C> / (sqrt(<X^T X, G>) ||dW||) is u C - v X G for two scalars u, v, so each step
        only mixes C and X G into X. Hence X = V W at every step, for the fixed basis V = [start, C, d_0]
        (m x 3r) and a small coefficient matrix W (3r x r) that starts as [I; 0; I]. Every quantity S needs is an
        r x r product once V's Gram matrix is known: <X, C> = <W, V^T C>, <X^T X, G> = <W G, (V^T V) W>.
        """
        rank = start.shape[-1]
        basis = torch.cat([start, C, correction], dim=-1)
        gram, basis_C = basis.mT @ basis, basis.mT @ C
        eye = torch.eye(rank, dtype=start.dtype, device=start.device).expand_as(G)
        none = torch.zeros_like(G)
        at_start, along_C = torch.cat([eye, none, none], dim=-2), torch.cat([none, eye, none], dim=-2)
        W = torch.cat([eye, none, eye], dim=-2)
        for _ in range(self.steps):
            WG = W @ G
            u, v = _cosine_terms((W * basis_C).sum((-2, -1), keepdim=True),
                                 (WG * (gram @ W)).sum((-2, -1), keepdim=True), ideal_norm)
            W = W - self.lr * (2 * self.lam * (W - at_start) - (u * along_C - v * WG))
        return basis @ W - start


def _cosine_terms(inner: Tensor, norm_sq: Tensor, target_norm: Tensor) -> tuple[Tensor, Tensor]:
    """For S = inner / (|x| |y|) with |x| = max(sqrt(norm_sq), EPS): the coefficients (u, v) of
    dS = u d(inner) - v d(norm_sq) / 2."""
    norm = lowrank.clamped_norm(norm_sq)
    u = 1 / (norm * target_norm)
    v = torch.where(norm_sq > lowrank.EPS**2, inner * u / norm**2, 0)
    return u, v


def _row_cosine_gradient(C: Tensor, G: Tensor, column_norms: Tensor) -> SimilarityGradient:
    """Column cosine with the residual on A: column j of B_bar A' is B_bar times row j of X = A'^T, so each row
    is a small matrix cosine of its own, averaged."""

    def gradient(X: Tensor) -> Tensor:
        XG = X @ G
        u, v = _cosine_terms((X * C).sum(-1, keepdim=True), (X * XG).sum(-1, keepdim=True), column_norms)
        return (u * C - v * XG) / X.shape[-2]

    return gradient


def _column_cosine_gradient(group: LayerGroup, column_norms: Tensor) -> SimilarityGradient:
    """Column cosine with the residual on B: column j of B' A_bar is B' a_j (a_j = column j of A_bar), and of dW
    is B_stack c_j (c_j = column j of A_stack). The per-column sums come back as small products:
    sum_j u_j dW[:, j] a_j^T = B_stack (A_stack (A_bar u)^T). A step costs O((out + in) K r^2)."""
    A_bar, A_stack, B_stack = group.A_bar, group.A_stack, group.B_stack

    def gradient(X: Tensor) -> Tensor:
        inner = lowrank.column_inner(X, A_bar, B_stack, A_stack).unsqueeze(-2)
        norm_sq = lowrank.column_norms_sq(X, A_bar).unsqueeze(-2)
        u, v = _cosine_terms(inner, norm_sq, column_norms)
        return (B_stack @ (A_stack @ (A_bar * u).mT) - X @ ((A_bar * v) @ A_bar.mT)) / A_bar.shape[-1]

    return gradient
