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
one as F (A_bar; or B_bar^T). Then, with C = dW F^T and G = F F^T, both computed once from the ideal update (on
the path the cost model picks: the stacked factors below the crossover, the dense dW above it),
    <X F, dW> = <X, C>     and     ||X F||^2 = <X^T X, G>,
and no out x in matrix is ever built. Per SGD step this costs O(r^3) for the whole-matrix cosine (which moves
only r x r coefficients, see `_coefficient_sgd`) and, for the column cosine, O((out + in) K r^2) factored or
O(out in r) dense, whichever is less. Gradients are analytic (the tests check them against autograd SGD on the dense
matrices), so aggregation also works under torch.no_grad or inference_mode; all layers of one shape step together.

Scale (`relative`, default True): the cosine is scale-invariant, so its gradient grows like 1 / ||B'|| and plain
SGD at a fixed lr overshoots when the factors are small, as they are after the first rounds of training from B = 0
(measured on the demo: B moved 1000x its own size and the cosine to dW fell below plain averaging). With
relative=True the correction is measured in units of the averaged factor, dB = ||B_bar||_F u, and SGD runs on
1 - S + lam ||u||^2: lr and lam then mean the same at every scale, and lam keeps ||dB|| / ||B_bar|| small, the
closeness the paper's Table 4 reports (S(B_bar, B') = 0.9998). relative=False is the literal Eq. 8 with lam on the
absolute ||dB||^2, as the public code; both are checked against dense autograd SGD. The xavier start is the public
code's absolute draw in either case. The frobenius objective has no step size and ignores `relative`.

Mixed ranks (`lower_ranks`): with "solve", each rank r below the global one gets Eq. 8 of its own, with the
truncated A_bar[:r] fixed and the regulariser towards the truncated B_bar[:, :r] (on the same dW, in the server's
scaling, see `ranks`), so that each rank's starting pair points as close to dW as its rank allows. The truncated
problems are the global one's with zero components (`LayerGroup.truncated`), which stay zero under every step, so
all ranks and all layers of every shape still go through one batched solve. "zero_pad" gives every client the
leading components of the global rank's solution, as a server that only zero-pads would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafair.aggregation import cost, lowrank
from lorafair.aggregation.base import Aggregator, check_option, is_count
from lorafair.aggregation.updates import GroupResult, LayerGroup, is_finite_number

Objective = Literal["cosine", "column_cosine", "frobenius"]
Init = Literal["zero", "xavier"]
ResidualOn = Literal["A", "B"]
LowerRanks = Literal["solve", "zero_pad"]
OBJECTIVES, INITS, RESIDUAL_ON = get_args(Objective), get_args(Init), get_args(ResidualOn)
LOWER_RANKS = get_args(LowerRanks)

SimilarityGradient = Callable[[Tensor], Tensor]
"""X -> dS/dX for a batch of corrected factors in tall form."""


@dataclass
class LoRAFAIR(Aggregator):
    lam: float = 0.01
    """Weight of lam ||dB||_F^2, which keeps B' near B_bar (paper: 0.01; 0 was its worst setting)."""
    objective: Objective = "cosine"
    """cosine (paper Eq. 8), column_cosine (public code) or frobenius (closed-form ridge)."""
    steps: int = 500
    """SGD steps for the cosine objectives."""
    lr: float = 0.01
    """SGD learning rate for the cosine objectives."""
    init: Init = "zero"
    """Start of dB for SGD: zero, or xavier (uniform, drawn from a generator seeded with `seed`)."""
    seed: int = 0
    """Seed of the xavier start; successive aggregate() calls of one instance draw new values (the trainer builds
    one instance per round with a seed derived from the run seed and the round, so a resumed run draws the same)."""
    residual_on: ResidualOn = "B"
    """Which averaged factor receives the correction: B (the method) or A (the paper's ablation)."""
    relative: bool = True
    """Cosine objectives: measure the correction in units of ||B_bar||_F (scale-free SGD), or absolutely (False)."""
    lower_ranks: LowerRanks = "solve"
    """Clients below the global rank: solve Eq. 8 for each rank with the truncated averages (solve), or take the
    leading components of the global rank's solution (zero_pad)."""

    name: ClassVar[str] = "lorafair"
    display_name: ClassVar[str] = "LoRA-FAIR"
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
        check_option(self.name, "relative", self.relative, isinstance(self.relative, bool), "true or false")
        check_option(self.name, "lower_ranks", self.lower_ranks, self.lower_ranks in LOWER_RANKS,
                     f"one of {LOWER_RANKS}")
        if self.objective != "frobenius":
            # Each step scales dB by (1 - 2 lr lam) before the similarity pulls it: beyond lr lam = 1 it diverges.
            check_option(self.name, "lam", self.lam, self.lr * self.lam < 1,
                         f"below 1 / lr = {1 / self.lr:g} for SGD to converge (or lower lr)")
        self._generator = torch.Generator().manual_seed(self.seed)

    def ideal_use(self) -> cost.IdealUse:
        if self.objective == "column_cosine":
            per_step = 2 if self.residual_on == "B" else 0
            return cost.IdealUse(products=2 + per_step * self.steps, column_norms=True)
        return cost.IdealUse(products=2)

    def combine_groups(self, groups: list[LayerGroup]) -> list[GroupResult]:
        """Every group, and under "solve" its truncation to each lower rank, in one batch."""
        truncated = [(index, rank, group.truncated(rank)) for index, group in enumerate(groups)
                     for rank in group.lower_ranks] if self.lower_ranks == "solve" else []
        results = self._solve([*groups, *(group for *_, group in truncated)])
        for (index, rank, _), result in zip(truncated, results[len(groups):], strict=True):
            results[index].by_rank[rank] = result.lora
        return results[:len(groups)]

    def _solve(self, groups: list[LayerGroup]) -> list[GroupResult]:
        if self.objective != "cosine":
            return super().combine_groups(groups)
        # The coefficient problems of the whole-matrix cosine are 3r x r for every layer shape: one batch for all.
        problems = [self._cosine_problem(group) for group in groups]
        W = self._coefficient_sgd(*(torch.cat(parts) for parts in zip(*(p[3:] for p in problems), strict=True)))
        sizes = [len(group.names) for group in groups]
        return [self._result(group, start, unit * (basis @ W_group) - start)
                for group, (start, unit, basis, *_), W_group in zip(groups, problems, W.split(sizes), strict=True)]

    def combine(self, group: LayerGroup) -> GroupResult:
        start, _, C, G = self._tall_form(group)
        if self.objective == "frobenius":
            ridge = G + self.lam * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
            return self._result(group, start, (C - start @ G) @ torch.linalg.pinv(ridge, hermitian=True))
        unit = self._unit(start)
        column_norms = lowrank.clamped_norm(group.ideal.column_norms_sq())
        gradient = (_row_cosine_gradient(C, G, column_norms[:, :, None]) if self.residual_on == "A"
                    else _column_cosine_gradient(group, column_norms[:, None, :]))
        return self._result(group, start, unit * self._sgd(start / unit, self._initial_correction(group, start) / unit,
                                                             gradient))

    def _tall_form(self, group: LayerGroup) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(start X0, fixed factor F, C = dW F^T, G = F F^T) with the corrected factor in tall form."""
        if self.residual_on == "B":
            start, fixed = group.B_bar, group.A_bar
            C = group.ideal.times(fixed.mT)
        else:
            start, fixed = group.A_bar.mT, group.B_bar.mT
            C = group.ideal.transposed_times(group.B_bar)
        return start, fixed, C, fixed @ fixed.mT

    def _unit(self, start: Tensor) -> Tensor:
        """S is scale-invariant in the corrected factor, so SGD on start / unit gives the correction in units."""
        if self.relative:
            return lowrank.clamped_norm(start.square().sum((-2, -1), keepdim=True))
        return torch.ones_like(start[..., :1, :1])

    def _result(self, group: LayerGroup, start: Tensor, correction: Tensor) -> GroupResult:
        corrected = start + correction
        A, B = (group.A_bar, corrected) if self.residual_on == "B" else (corrected.mT, group.B_bar)
        return GroupResult(lora=(A, B), metrics={
            "cos": group.cosine_to_ideal(B, A),
            "cos_factor": F.cosine_similarity(start.flatten(1), corrected.flatten(1), dim=1, eps=lowrank.EPS),
        })

    def _initial_correction(self, group: LayerGroup, start: Tensor) -> Tensor:
        """Zero, or xavier_uniform_ of each correction matrix (of its kept components in a truncated group)."""
        if self.init == "zero":
            return torch.zeros_like(start)
        rank = group.kept_rank or start.shape[-1]
        bound = math.sqrt(6.0 / (start.shape[-2] + rank))
        correction = (2 * torch.rand(start.shape, generator=self._generator, dtype=start.dtype) - 1) * bound
        correction[..., rank:] = 0
        return correction.to(start.device)

    def _sgd(self, start: Tensor, correction: Tensor, similarity_gradient: SimilarityGradient) -> Tensor:
        """Plain SGD on 1 - S(start + d) + lam ||d||^2, as torch.optim.SGD would step it."""
        for _ in range(self.steps):
            gradient = 2 * self.lam * correction - similarity_gradient(start + correction)
            correction = correction - self.lr * gradient
        return correction

    def _cosine_problem(self, group: LayerGroup) -> tuple[Tensor, ...]:
        """The whole-matrix cosine SGD in coefficient form: O(r^3) per step instead of O(m r^2).

        The gradient of S = <X, C> / (sqrt(<X^T X, G>) ||dW||) is u C - v X G for two scalars u, v, so each step
        only mixes C and X G into X. Hence X = V W at every step, for the fixed basis V = [X0, C, d_0] (m x 3r,
        X0 the start in units) and a small coefficient matrix W (3r x r) that starts as [I; 0; I]. Every quantity
        S needs is an r x r product once V's Gram matrix is known: <X, C> = <W, V^T C>, <X^T X, G> =
        <W G, (V^T V) W>. Returns (start, unit, V, W0, G, V^T V, V^T C, ||dW||).
        """
        start, _, C, G = self._tall_form(group)
        unit = self._unit(start)
        basis = torch.cat([start / unit, C, self._initial_correction(group, start) / unit], dim=-1)
        rank = start.shape[-1]
        eye = torch.eye(rank, dtype=start.dtype, device=start.device).expand_as(G)
        W = torch.cat([eye, torch.zeros_like(G), eye], dim=-2)
        ideal_norm = lowrank.clamped_norm(group.ideal.norm_sq)[:, None, None]
        return start, unit, basis, W, G, basis.mT @ basis, basis.mT @ C, ideal_norm

    def _coefficient_sgd(self, W: Tensor, G: Tensor, gram: Tensor, basis_C: Tensor, ideal_norm: Tensor) -> Tensor:
        """Plain SGD on the coefficients W of X = V W (see `_cosine_problem`), batched over every layer."""
        rank = G.shape[-1]
        at_start, along_C = torch.zeros_like(W), torch.zeros_like(W)
        at_start[:, :rank] = torch.eye(rank, dtype=W.dtype, device=W.device)
        along_C[:, rank:2 * rank] = at_start[:, :rank]
        for _ in range(self.steps):
            WG = W @ G
            u, v = _cosine_terms((W * basis_C).sum((-2, -1), keepdim=True),
                                 (WG * (gram @ W)).sum((-2, -1), keepdim=True), ideal_norm)
            W = W - self.lr * (2 * self.lam * (W - at_start) - (u * along_C - v * WG))
        return W


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
    is dW[:, j]. Both per-column sums are products with the ideal update: the inners are the diagonal of
    A_bar^T (X^T dW), and sum_j u_j dW[:, j] a_j^T = dW (A_bar u)^T. A step costs two such products."""
    A_bar, ideal = group.A_bar, group.ideal

    def gradient(X: Tensor) -> Tensor:
        inner = (ideal.transposed_times(X).mT * A_bar).sum(-2, keepdim=True)
        norm_sq = lowrank.column_norms_sq(X, A_bar).unsqueeze(-2)
        u, v = _cosine_terms(inner, norm_sq, column_norms)
        return (ideal.times((A_bar * u).mT) - X @ ((A_bar * v) @ A_bar.mT)) / A_bar.shape[-1]

    return gradient
