"""HetLoRA: clients of different ranks, zero-padded to the largest, averaged with weights proportional to the norm of
each client's update, each client sent its leading components.

Expectations come another way than the code: each client's update formed densely in its own scaling alpha / r_k and
its norm taken from that out x in matrix (the code uses r x r products in the server's scaling), padding by hand,
and the dense reference of `lorafair.aggregation.reference`."""

from __future__ import annotations

import pytest
import torch

from lorafair.aggregation import ClientUpdate, build_aggregator
from lorafair.aggregation.reference import dense_reference

SHAPES = {"blocks.0.attn.proj": (12, 10), "blocks.0.mlp.fc2": (12, 17), "blocks.1.attn.proj": (12, 10)}
"""name -> (out, in); two layers of one shape run as one batch."""
RANK = 4
ALPHA = 16.0
WEIGHTS = (3.0, 1.0, 6.0, 2.5, 0.5)


def updates_at(own_ranks: tuple[int, ...], seed: int = 0, scales: tuple[float, ...] | None = None
               ) -> list[ClientUpdate]:
    """One update per weight, client k at rank own_ranks[k], its B times scales[k] (so the norms differ widely)."""
    generator = torch.Generator().manual_seed(seed)
    scales = scales or (1.0, 0.2, 3.0, 0.7, 1.5)
    return [ClientUpdate(weight, {name: (torch.randn(rank, fan_in, generator=generator, dtype=torch.float64),
                                         scale * torch.randn(fan_out, rank, generator=generator, dtype=torch.float64))
                                  for name, (fan_out, fan_in) in SHAPES.items()},
                         {"head.weight": torch.randn(3, 4, generator=generator, dtype=torch.float64)})
            for weight, rank, scale in zip(WEIGHTS, own_ranks, scales, strict=True)]


def by_hand(updates: list[ClientUpdate], name: str) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The rank-RANK pair in the server's scaling alpha / RANK and the clients' weights: norms of the dense updates
    (alpha / r_k) B_k A_k, factors padded with zeros, B carried into the server's scaling."""
    norms, padded = [], []
    for update in updates:
        A, B = update.lora[name]
        rank = A.shape[0]
        norms.append(float(torch.linalg.matrix_norm((ALPHA / rank) * B @ A)))
        A_padded = torch.zeros(RANK, A.shape[1], dtype=A.dtype)
        B_padded = torch.zeros(B.shape[0], RANK, dtype=B.dtype)
        A_padded[:rank] = A
        B_padded[:, :rank] = B * (ALPHA / rank) / (ALPHA / RANK)  # the same update at the server's scaling
        padded.append((A_padded, B_padded))
    weights = [norm / sum(norms) for norm in norms]
    A_mean = sum(w * A for w, (A, _) in zip(weights, padded, strict=True))
    B_mean = sum(w * B for w, (_, B) in zip(weights, padded, strict=True))
    return A_mean, B_mean, weights


@pytest.mark.parametrize("own_ranks", [(RANK,) * 5, (RANK, 2, 1, 3, RANK), (RANK, 1, 1, 2, 2)])
def test_the_norm_weighted_average_of_the_padded_factors_matches_the_dense_forms(own_ranks):
    updates = updates_at(own_ranks)
    out = build_aggregator("hetlora").aggregate(updates)
    reference = dense_reference("hetlora", updates, alpha=ALPHA)
    for name in SHAPES:
        A_mean, B_mean, weights = by_hand(updates, name)
        assert max(weights) > 2 * min(weights)  # the norms differ: weighting by them is not a plain mean
        torch.testing.assert_close(out.lora[name][0], A_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.lora[name][1], B_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.lora[name], reference.lora[name], rtol=0, atol=1e-12)
    total = sum(WEIGHTS)  # the head is averaged by sample count
    torch.testing.assert_close(out.extra["head.weight"], sum(u.weight / total * u.extra["head.weight"]
                                                             for u in updates))


def test_each_client_starts_from_the_leading_components_of_its_own_rank():
    own_ranks = (RANK, 2, 1, 3, RANK)
    updates = updates_at(own_ranks, seed=1)
    out = build_aggregator("hetlora").aggregate(updates)
    reference = dense_reference("hetlora", updates, alpha=ALPHA)
    for name, (fan_out, fan_in) in SHAPES.items():
        A_mean, B_mean, _ = by_hand(updates, name)
        for rank in (1, 2, 3):
            A, B = out.lora_for(rank)[name]
            assert A.shape == (rank, fan_in) and B.shape == (fan_out, rank)
            # its own model, s_r B A, is the global model's first r components, s_R B'[:, :r] A'[:r]
            torch.testing.assert_close((ALPHA / rank) * B @ A, (ALPHA / RANK) * B_mean[:, :rank] @ A_mean[:rank],
                                       rtol=0, atol=1e-12)
            torch.testing.assert_close((A, B), reference.by_rank[rank][name], rtol=0, atol=1e-12)
        assert out.lora_for(RANK)[name] is out.lora[name]
    bytes_of = {rank: sum(rank * (fan_in + fan_out) for fan_out, fan_in in SHAPES.values()) * 8 + 3 * 4 * 8
                for rank in (1, 2, 3, RANK)}
    assert all(out.bytes_for(rank) == (bytes_of[rank], bytes_of[rank]) for rank in bytes_of)


def test_sample_counts_weigh_only_the_head_and_zero_products_fall_back_to_them():
    """The LoRA weights are the norms alone: changing a client's example count moves the head, not the factors. A
    round whose products are all zero (every B = 0) averages the factors by sample count."""
    updates = updates_at((RANK, 2, 1, 3, RANK), seed=2)
    out = build_aggregator("hetlora").aggregate(updates)
    updates[2].weight = 60.0
    heavier = build_aggregator("hetlora").aggregate(updates)
    for name in SHAPES:
        assert torch.equal(out.lora[name][0], heavier.lora[name][0])
        assert torch.equal(out.lora[name][1], heavier.lora[name][1])
    assert not torch.equal(out.extra["head.weight"], heavier.extra["head.weight"])

    for update in updates:
        update.lora = {name: (A, torch.zeros_like(B)) for name, (A, B) in update.lora.items()}
    zero = build_aggregator("hetlora").aggregate(updates)
    total = sum(u.weight for u in updates)
    for name in SHAPES:
        A_mean = torch.zeros(RANK, SHAPES[name][1], dtype=torch.float64)
        for update in updates:
            A = update.lora[name][0]
            A_mean[:A.shape[0]] += (update.weight / total) * A
        torch.testing.assert_close(zero.lora[name][0], A_mean, rtol=0, atol=1e-12)
        assert not zero.lora[name][1].any()
