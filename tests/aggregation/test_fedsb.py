"""Fed-SB: dW = s B0 R A0 with A0 and B0 frozen and shared, only the r x r core R trained and sent; the server's
average of this round's cores is exact, and the start is the rank-r cut of the first SGD step -lr G.

Expectations come another way than the code: the truncated step from an eigendecomposition of G G^T (not an SVD of
G), the averages and products formed densely by plain loops, the bytes counted by hand."""

from __future__ import annotations

import pytest
import torch

from lorafair.aggregation import ClientRule, ClientUpdate, build_aggregator, core_of, gradient_start
from lorafair.cli import main
from lorafair.config import ConfigError
from lorafair.flower.strategy import strategy_refusal
from tests.helpers import parse_fit_args, tiny_args

SHAPES = {"blocks.0.attn.proj": (12, 10), "blocks.0.mlp.fc2": (12, 17), "blocks.1.attn.proj": (9, 10)}
RANK = 3
WEIGHTS = (3.0, 1.0, 6.0, 2.5)
SCALING = 16.0 / RANK


def _basis(generator: torch.Generator, fan_out: int, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0): A0 with orthonormal rows, B0 any."""
    A0 = torch.linalg.qr(torch.randn(fan_in, RANK, generator=generator, dtype=torch.float64)).Q.T
    return A0, torch.randn(fan_out, RANK, generator=generator, dtype=torch.float64)


def _round(generator: torch.Generator, bases: dict, head: torch.Tensor) -> list[ClientUpdate]:
    """One round's updates: client k sends A_k = R_k A0 with its own random core, B0 unchanged."""
    return [ClientUpdate(weight, {name: (torch.randn(RANK, RANK, generator=generator, dtype=torch.float64) @ A0, B0)
                                  for name, (A0, B0) in bases.items()}, {"head.weight": head + weight})
            for weight in WEIGHTS]


def test_the_start_is_the_rank_r_cut_of_the_first_sgd_step():
    generator = torch.Generator().manual_seed(0)
    gradient, lr = torch.randn(12, 17, generator=generator, dtype=torch.float64), 0.05
    R0, A0, B0 = gradient_start(gradient, RANK, SCALING, lr)
    # the best rank-r approximation of -lr G: its projection on the top-r eigenvectors of G G^T
    _, vectors = torch.linalg.eigh(gradient @ gradient.T)
    top = vectors[:, -RANK:]
    expected = top @ top.T @ (-lr * gradient)
    torch.testing.assert_close(SCALING * B0 @ R0 @ A0, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(A0 @ A0.T, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(B0.T @ B0, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(R0, torch.diag(torch.diagonal(R0))) and bool((torch.diagonal(R0) >= 0).all())


def test_one_round_is_the_dense_mean_of_the_clients_products_and_only_cores_travel():
    generator = torch.Generator().manual_seed(1)
    bases = {name: _basis(generator, *shape) for name, shape in SHAPES.items()}
    head = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    like = ClientUpdate(1.0, {name: (torch.randn(RANK, RANK, generator=generator, dtype=torch.float64) @ A0, B0)
                              for name, (A0, B0) in bases.items()}, {"head.weight": head})
    updates = _round(generator, bases, head)
    out = build_aggregator("fed_sb").aggregate(updates, like=like)
    total = sum(WEIGHTS)
    for name, (A0, B0) in bases.items():
        R_bar = sum(u.weight / total * core_of(u.lora[name][0], A0) for u in updates)
        ideal = sum(u.weight / total * SCALING * u.lora[name][1] @ u.lora[name][0] for u in updates)
        A, B = out.lora[name]
        assert torch.equal(B, B0)  # frozen: the template's, bit for bit
        torch.testing.assert_close(A, R_bar @ A0, rtol=0, atol=1e-12)
        torch.testing.assert_close(SCALING * B @ A, ideal, rtol=0, atol=1e-12)  # exact: B0 R_bar A0
    # up and down: r^2 float64 numbers a layer and the head, never the r x in A
    assert out.bytes_up == out.bytes_down == len(SHAPES) * RANK * RANK * 8 + head.numel() * 8


def test_the_average_takes_this_rounds_cores_only():
    """Two rounds with different cores: the second answer is the mean of the second round's cores, not of both
    rounds' (a server that kept every earlier client's R in its average would answer the latter)."""
    generator = torch.Generator().manual_seed(2)
    bases = {name: _basis(generator, *shape) for name, shape in SHAPES.items()}
    head = torch.zeros(5, 7, dtype=torch.float64)
    aggregator = build_aggregator("fed_sb")
    first = _round(generator, bases, head)
    answer = aggregator.aggregate(first, like=first[0], round_index=1)
    second = _round(generator, bases, head)
    like = ClientUpdate(1.0, answer.lora, answer.extra)
    out = aggregator.aggregate(second, like=like, round_index=2)
    total = sum(WEIGHTS)
    for name, (A0, _) in bases.items():
        this_round = sum(u.weight / total * core_of(u.lora[name][0], A0) for u in second)
        both_rounds = sum(u.weight / (2 * total) * core_of(u.lora[name][0], A0) for u in first + second)
        R = core_of(out.lora[name][0], A0)
        torch.testing.assert_close(R, this_round, rtol=0, atol=1e-12)
        assert not torch.allclose(R, both_rounds, rtol=0, atol=1e-3)


def test_a_client_that_changed_b_is_refused():
    generator = torch.Generator().manual_seed(3)
    bases = {name: _basis(generator, *shape) for name, shape in SHAPES.items()}
    updates = _round(generator, bases, torch.zeros(5, 7, dtype=torch.float64))
    name = next(iter(SHAPES))
    A, B = updates[2].lora[name]
    updates[2].lora[name] = (A, B + 1e-3)
    with pytest.raises(ValueError, match=rf"^fed_sb: client 2 sent a different B than client 0 for layer '{name}'"):
        build_aggregator("fed_sb").aggregate(updates, like=updates[0])


def test_a_rule_that_sends_a_core_of_an_a_it_does_not_upload_is_refused():
    with pytest.raises(ValueError, match=r"^ClientRule: core sends A as its r x r core, but clients upload 'B' and "
                                         r"keep ''; upload A"):
        ClientRule(trains="B", sends="B", core=True)


def test_fed_sb_is_refused_at_mixed_ranks_with_4_bit_weights_in_lora_strategy_and_with_a_bad_option(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^lora\.client_ranks: fed_sb takes no clients of different ranks"):
        parse_fit_args(tiny_args(tmp_path, "--server.method", "fed_sb", "--lora.client_ranks", "[2, 4]"))
    with pytest.raises(ConfigError, match=r"^server\.init_batches: must be an integer >= 1, got 0"):
        parse_fit_args(tiny_args(tmp_path, "--server.method", "fed_sb", "--server.init_batches", "0"))
    assert main(["fit", "--config", "demo_text", "--model.load_in_4bit", "true", "--server.method", "fed_sb"]) == 2
    assert ("model.load_in_4bit: fed_sb starts from the gradient of the loss at the frozen weights, which 4-bit "
            "weights do not have") in capsys.readouterr().err
    # lorafair flower makes the gradient exchange (tests/flower/test_app_starts.py); LoraStrategy does not
    assert strategy_refusal("fed_sb") == ("fed_sb cannot run in LoraStrategy: its LoRA starts from the SVD of a "
                                          "gradient every client takes before round 1, an exchange the strategy does "
                                          "not make; run it with lorafair flower (lorafair's own ServerApp and "
                                          "ClientApp) or lorafair fit")
