"""Dense textbook versions of every method, layer by layer: build dW = sum p_k B_k A_k (out x in), then apply the
formula as written (dense SVD, dense least squares, autograd SGD on the dense matrices).

Slow by design, and CPU only (least squares uses the gelsd driver). They are the yardstick the fast methods are
tested and benchmarked against.

Mixed ranks, as the methods define them (docs/ranks.md): with scalings s_r = alpha / r and R the largest rank, each
client's B is taken in the server's scaling, (s_k / s_R) B_k, and zero-padded to R, as is A_k; the method runs at R;
a rank-r client then starts from the leading r components, its B times s_R / s_r, except LoRA-FAIR under "solve",
which solves Eq. 8 again on the r x in and out x r truncated averages themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafair.aggregation.updates import ClientUpdate

Factors = tuple[Tensor, Tensor]


@dataclass
class DenseResult:
    """lora: name -> (A, B) clients restart from, or None. merge: name -> dense out x in matrix added to W0, or None."""

    lora: dict[str, Factors] | None
    merge: dict[str, Tensor] | None
    by_rank: dict[int, dict[str, Factors]]
    """Lower rank r -> name -> the rank-r client's starting pair, in its own scaling."""


@dataclass
class _Layer:
    """One layer's client factors and normalised weights; the averages and the dense ideal update on first use."""

    As: list[Tensor]
    Bs: list[Tensor]
    p: list[float]
    template: int = 0
    """The first client of the global rank."""

    @cached_property
    def A_bar(self) -> Tensor:
        return sum(p * A for p, A in zip(self.p, self.As, strict=True))

    @cached_property
    def B_bar(self) -> Tensor:
        return sum(p * B for p, B in zip(self.p, self.Bs, strict=True))

    @cached_property
    def dW(self) -> Tensor:
        return sum(p * B @ A for p, A, B in zip(self.p, self.As, self.Bs, strict=True))


@dataclass
class _Truncated:
    """The averages cut to rank r (r x in, out x r) and the same dW: the problem a rank-r LoRA-FAIR client gets."""

    A_bar: Tensor
    B_bar: Tensor
    dW: Tensor


def dense_reference(method: str, updates: Sequence[ClientUpdate], alpha: float = 16.0,
                    **options: object) -> DenseResult:
    """The dense result of `method` (lorafair: zero start only) on `updates`, at any mix of ranks (alpha only sets
    the scalings, whose ratios are what matter)."""
    total = sum(u.weight for u in updates)
    p = [u.weight / total for u in updates]
    lower_ranks = options.pop("lower_ranks", "solve")
    lora, merge, by_rank = {}, {}, {}
    for name in updates[0].lora:
        global_rank = max(u.lora[name][0].shape[0] for u in updates)
        padded = [_padded(*u.lora[name], global_rank, alpha) for u in updates]
        template = next(k for k, u in enumerate(updates) if u.lora[name][0].shape[0] == global_rank)
        layer = _Layer([A for A, _ in padded], [B for _, B in padded], p, template)
        factors, merged = _METHODS[method](layer, **options)
        if factors is not None:
            lora[name] = factors
        if merged is not None:
            merge[name] = merged
        for rank in sorted({u.lora[name][0].shape[0] for u in updates} - {global_rank}):
            if factors is None:
                continue
            A, B = factors
            if method == "lorafair" and lower_ranks == "solve":
                A, B = _lorafair(_Truncated(layer.A_bar[:rank], layer.B_bar[:, :rank], layer.dW), **options)[0]
            by_rank.setdefault(rank, {})[name] = (A[:rank], B[:, :rank] * (alpha / global_rank) / (alpha / rank))
    return DenseResult(lora=lora or None, merge=merge or None, by_rank=by_rank)


def _padded(A: Tensor, B: Tensor, global_rank: int, alpha: float) -> Factors:
    """A rank-r pair in the server's scaling s_R: B times s_r / s_R, both zero-padded to the global rank."""
    missing = global_rank - A.shape[0]
    scaled_B = B * ((alpha / A.shape[0]) / (alpha / global_rank))
    return (torch.cat([A, A.new_zeros(missing, A.shape[1])]),
            torch.cat([scaled_B, B.new_zeros(B.shape[0], missing)], dim=1))


def _fedit(layer: _Layer) -> tuple[Factors, None]:
    return (layer.A_bar, layer.B_bar), None


def _ffa_lora(layer: _Layer) -> tuple[Factors, None]:
    """The shared frozen A is the global rank's (a lower-rank client's is its leading rows, zero-padded here)."""
    return (layer.As[layer.template], layer.B_bar), None


def _fedsa_lora(layer: _Layer) -> tuple[Factors, None]:
    """A averaged; B is the template's, which the server never changes (each client keeps its own)."""
    return (layer.A_bar, layer.Bs[layer.template]), None


def _rolora(layer: _Layer, round_index: int = 1) -> tuple[Factors, None]:
    """The factor trained this round averaged (B in odd rounds, A in even ones), the other the shared one."""
    if round_index % 2 == 1:
        return (layer.As[layer.template], layer.B_bar), None
    return (layer.A_bar, layer.Bs[layer.template]), None


def _fedsvd(layer: _Layer, round_index: int = 1, svd_period: int = 1,
            svd_warmup: int = 0) -> tuple[Factors, None]:
    """B averaged with the shared frozen A; in a refactoring round, the dense SVD of the product B_bar A: A = V_r^T,
    B = U_r S_r."""
    A = layer.As[layer.template]
    if round_index <= svd_warmup or (round_index - svd_warmup) % svd_period:
        return (A, layer.B_bar), None
    rank = A.shape[0]
    U, S, Vh = torch.linalg.svd(layer.B_bar @ A, full_matrices=False)
    return (Vh[:rank], U[:, :rank] * S[:rank]), None


def _hetlora(layer: _Layer) -> tuple[Factors, None]:
    """The padded factors averaged with weights ||B_k A_k||_F / sum_j ||B_j A_j||_F (dense products; the sample
    weights where every product is zero)."""
    norms = [torch.linalg.matrix_norm(B @ A).item() for A, B in zip(layer.As, layer.Bs, strict=True)]
    total = sum(norms)
    weights = [norm / total for norm in norms] if total > 0 else layer.p
    return (sum(w * A for w, A in zip(weights, layer.As, strict=True)),
            sum(w * B for w, B in zip(weights, layer.Bs, strict=True))), None


def _frlora(layer: _Layer) -> tuple[Factors, Tensor]:
    """The template's pair (the SVD start every client began from) back, and the dense change of the averaged
    product merged: B_bar A_bar - B0 A0."""
    A0, B0 = layer.As[layer.template], layer.Bs[layer.template]
    return (A0, B0), layer.B_bar @ layer.A_bar - B0 @ A0


def _fed_sb(layer: _Layer) -> tuple[Factors, None]:
    """A averaged (each A_k = R_k A0, so A_bar = R_bar A0 with R_bar = sum p_k R_k); B the shared frozen B0."""
    return (layer.A_bar, layer.Bs[layer.template]), None


def _flora(layer: _Layer) -> tuple[None, Tensor]:
    return None, layer.dW


def _flexlora(layer: _Layer) -> tuple[Factors, None]:
    rank = layer.As[0].shape[0]
    U, S, Vh = torch.linalg.svd(layer.dW, full_matrices=False)
    return (Vh[:rank], U[:, :rank] * S[:rank]), None


def _fedex_lora(layer: _Layer) -> tuple[Factors, Tensor]:
    return (layer.A_bar, layer.B_bar), layer.dW - layer.B_bar @ layer.A_bar


def _lorafair(layer: _Layer | _Truncated, lam: float = 0.01, objective: str = "cosine", steps: int = 500,
              lr: float = 0.01, residual_on: str = "B", relative: bool = True) -> tuple[Factors, None]:
    def product(delta: Tensor) -> Tensor:
        return (layer.B_bar + delta) @ layer.A_bar if residual_on == "B" else layer.B_bar @ (layer.A_bar + delta)

    if objective == "frobenius":
        delta = _ridge(layer, lam, residual_on)
    else:
        similarity: Callable[[Tensor], Tensor] = (
            (lambda X: F.cosine_similarity(layer.dW.flatten(), X.flatten(), dim=0)) if objective == "cosine"
            else (lambda X: F.cosine_similarity(layer.dW, X, dim=0).mean()))
        start = layer.B_bar if residual_on == "B" else layer.A_bar
        unit = start.norm() if relative else 1.0  # relative: the correction is unit * u, regularised as ||u||^2
        u = torch.zeros_like(start, requires_grad=True)
        optimizer = torch.optim.SGD([u], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                loss = 1 - similarity(product(unit * u)) + lam * u.pow(2).sum()
                loss.backward()
                optimizer.step()
        delta = unit * u.detach()
    if residual_on == "B":
        return (layer.A_bar, layer.B_bar + delta), None
    return (layer.A_bar + delta, layer.B_bar), None


def _ridge(layer: _Layer | _Truncated, lam: float, residual_on: str) -> Tensor:
    """Ridge regression as an augmented least-squares problem: min ||delta F - R||^2 + lam ||delta||^2 is
    min ||[F^T; sqrt(lam) I] delta^T - [R^T; 0]||^2 (residual on B, F = A_bar; on A the same with transposes)."""
    residual = layer.dW - layer.B_bar @ layer.A_bar
    fixed, target = (layer.A_bar.T, residual.T) if residual_on == "B" else (layer.B_bar, residual)
    rank = fixed.shape[1]
    eye = torch.eye(rank, dtype=fixed.dtype, device=fixed.device)
    system = torch.cat([fixed, lam**0.5 * eye])
    rhs = torch.cat([target, target.new_zeros(rank, target.shape[1])])
    solution = torch.linalg.lstsq(system, rhs).solution
    return solution.T if residual_on == "B" else solution


def _florana(layer: _Layer, sweeps: int = 1) -> tuple[Factors, None]:
    """Alternating least squares from the averages; each step the least-squares correction of smallest norm."""
    A, B = layer.A_bar, layer.B_bar
    for _ in range(sweeps):
        B = B + torch.linalg.lstsq(A.T, (layer.dW - B @ A).T, driver="gelsd").solution.T
        A = A + torch.linalg.lstsq(B, layer.dW - B @ A, driver="gelsd").solution
    return (A, B), None


_METHODS: dict[str, Callable[..., tuple[Factors | None, Tensor | None]]] = {
    "fedit": _fedit,
    "ffa_lora": _ffa_lora,
    "flora": _flora,
    "flexlora": _flexlora,
    "lorafair": _lorafair,
    "florana": _florana,
    "fedex_lora": _fedex_lora,
    "fedsa_lora": _fedsa_lora,
    "rolora": _rolora,
    "fedsvd": _fedsvd,
    "hetlora": _hetlora,
    "frlora": _frlora,
    "feddpa": _fedit,  # the global pairs averaged, as FedIT; the local adapters never reach the server
    "fed_sb": _fed_sb,
}
