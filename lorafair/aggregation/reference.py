"""Dense textbook versions of every method, layer by layer: build dW = sum p_k B_k A_k (out x in), then apply the
formula as written (dense SVD, dense least squares, autograd SGD on the dense matrices).

Slow by design, and CPU only (least squares uses the gelsd driver). They are the yardstick the fast methods are
tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafair.aggregation.base import ClientUpdate

Factors = tuple[Tensor, Tensor]


@dataclass
class DenseResult:
    """lora: name -> (A, B) clients restart from, or None. merge: name -> dense out x in matrix added to W0, or None."""

    lora: dict[str, Factors] | None
    merge: dict[str, Tensor] | None


@dataclass
class _Layer:
    """One layer's client factors and normalised weights; the averages and the dense ideal update on first use."""

    As: list[Tensor]
    Bs: list[Tensor]
    p: list[float]

    @cached_property
    def A_bar(self) -> Tensor:
        return sum(p * A for p, A in zip(self.p, self.As, strict=True))

    @cached_property
    def B_bar(self) -> Tensor:
        return sum(p * B for p, B in zip(self.p, self.Bs, strict=True))

    @cached_property
    def dW(self) -> Tensor:
        return sum(p * B @ A for p, A, B in zip(self.p, self.As, self.Bs, strict=True))


def dense_reference(method: str, updates: Sequence[ClientUpdate], **options: object) -> DenseResult:
    """The dense result of `method` (lorafair: zero start only) on `updates`."""
    total = sum(u.weight for u in updates)
    p = [u.weight / total for u in updates]
    lora, merge = {}, {}
    for name in updates[0].lora:
        layer = _Layer([u.lora[name][0] for u in updates], [u.lora[name][1] for u in updates], p)
        factors, merged = _METHODS[method](layer, **options)
        if factors is not None:
            lora[name] = factors
        if merged is not None:
            merge[name] = merged
    return DenseResult(lora=lora or None, merge=merge or None)


def _fedit(layer: _Layer) -> tuple[Factors, None]:
    return (layer.A_bar, layer.B_bar), None


def _ffa_lora(layer: _Layer) -> tuple[Factors, None]:
    return (layer.As[0], layer.B_bar), None


def _flora(layer: _Layer) -> tuple[None, Tensor]:
    return None, layer.dW


def _flexlora(layer: _Layer) -> tuple[Factors, None]:
    rank = layer.As[0].shape[0]
    U, S, Vh = torch.linalg.svd(layer.dW, full_matrices=False)
    return (Vh[:rank], U[:, :rank] * S[:rank]), None


def _fedex_lora(layer: _Layer) -> tuple[Factors, Tensor]:
    return (layer.A_bar, layer.B_bar), layer.dW - layer.B_bar @ layer.A_bar


def _lorafair(layer: _Layer, lam: float = 0.01, objective: str = "cosine", steps: int = 500, lr: float = 0.01,
              residual_on: str = "B", relative: bool = True) -> tuple[Factors, None]:
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


def _ridge(layer: _Layer, lam: float, residual_on: str) -> Tensor:
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
}
