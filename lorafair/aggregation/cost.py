"""The cost model that picks, per layer group, whether the ideal update dW = sum p_k B_k A_k is held factored or
dense (see `ideal`): floating-point operations of the whole round on each path, from K, r, out and in.

With S = K r stacked ranks (multiply-adds count 2):

| operation | factored | dense |
| --- | --- | --- |
| hold dW | nothing | fold it in: 2 S out in |
| ||dW||^2, or the norms of its columns | Gram matrices: 2 S^2 (out + in) | 2 out in |
| dW X or dW^T Y, X with r columns | 2 r S (out + in) | 2 r out in |
| best rank-r pair | QR of both stacks + SVD of the core | eigh of the smaller Gram matrix |

The memory held follows the same way: S (out + in) numbers factored, out in (plus a chunk of factors being folded)
dense. Every cosine metric shares ||dW||^2 and adds one product; the method's own uses come from
`Aggregator.ideal_use`. Without an SVD the paths cross where S (out + in) = out in, at K r = 614 for a 768 x 3072
layer and 384 for 768 x 768: 38 and 24 clients at rank 16.
"""

from __future__ import annotations

from dataclasses import dataclass

PATHS = ("factored", "dense")


@dataclass(frozen=True)
class IdealUse:
    """What a method's finish asks of dW, besides the cos_avg metric (counted for every method)."""

    products: int = 0
    """dW X or dW^T Y with r columns (a cosine metric of the pair sent counts one)."""
    column_norms: bool = False
    """The norm of every column of dW (the column cosine)."""
    svd: bool = False
    """The best rank-r approximation of dW."""


def flops(use: IdealUse, path: str, clients: int, rank: int, fan_out: int, fan_in: int) -> float:
    """Estimated operations of one layer's round on `path`, including cos_avg = cos(dW, B_bar A_bar)."""
    stacked, both = clients * rank, fan_out + fan_in
    norms, products = 1 + use.column_norms, 1 + use.products
    if path == "factored":
        total = norms * 2 * stacked**2 * both + products * 2 * rank * stacked * both
        if use.svd:
            total += _qr(fan_out, stacked) + _qr(fan_in, stacked) + _svd(min(fan_out, stacked), min(fan_in, stacked))
        return total
    small, large = min(fan_out, fan_in), max(fan_out, fan_in)
    total = 2 * stacked * fan_out * fan_in + norms * 2 * fan_out * fan_in + products * 2 * rank * fan_out * fan_in
    if use.svd:  # Gram matrix, its eigh, then U^T dW and dW A^T
        total += 2 * small**2 * large + 9 * small**3 + 4 * rank * fan_out * fan_in
    return total


def cheaper_path(use: IdealUse, clients: int, rank: int, fan_out: int, fan_in: int) -> str:
    """'dense' when its estimate is lower, else 'factored'."""
    estimates = {path: flops(use, path, clients, rank, fan_out, fan_in) for path in PATHS}
    return "dense" if estimates["dense"] < estimates["factored"] else "factored"


def chunk_clients(rank: int, fan_out: int, fan_in: int) -> int:
    """Clients whose factors wait in a chunk before being folded into a dense dW in one batched product: as many
    as fill half of dW's size, so the chunk never holds more than the dense accumulator."""
    return max(1, fan_out * fan_in // (2 * (fan_out + fan_in) * rank))


def _qr(rows: int, columns: int) -> float:
    return 2 * rows * columns * min(rows, columns)


def _svd(rows: int, columns: int) -> float:
    small = min(rows, columns)
    return 4 * rows * columns * small + 22 * small**3
