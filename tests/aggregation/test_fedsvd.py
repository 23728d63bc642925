"""FedSVD: A frozen, B averaged, and every `svd_period` rounds after `svd_warmup` the product B A refactored by SVD.

Expectations come another way than the code: weighted means by plain loops, the SVD of the dense product B_bar A
(out x in, which the code never forms), orthonormality and the kept product as invariants, and in a run the model's
own parameters at each client's first step."""

from __future__ import annotations

import pytest
import torch

from lorafair.aggregation import ClientUpdate, build_aggregator
from lorafair.config import ConfigError
from tests.helpers import parse_fit_args, spied_run, tiny_args, tiny_config

SHAPES = {"blocks.0.attn.proj": (12, 10), "blocks.0.mlp.fc2": (12, 17), "blocks.1.attn.proj": (12, 10)}
"""name -> (out, in); two layers of one shape run as one batch."""
RANK = 3
WEIGHTS = (3.0, 1.0, 6.0, 2.5)
ALPHA = 16.0


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def server_and_updates(seed: int = 0) -> tuple[ClientUpdate, list[ClientUpdate]]:
    """The server's pairs (the template) and one update per weight: the server's A, a trained (random) B."""
    generator = torch.Generator().manual_seed(seed)
    server = ClientUpdate(1.0, {name: (randn(generator, RANK, fan_in), randn(generator, fan_out, RANK))
                                for name, (fan_out, fan_in) in SHAPES.items()}, {"head.weight": randn(generator, 3, 4)})
    updates = [ClientUpdate(weight, {name: (A.clone(), randn(generator, *B.shape))
                                     for name, (A, B) in server.lora.items()}, {"head.weight": randn(generator, 3, 4)})
               for weight in WEIGHTS]
    return server, updates


def mean_B(updates: list[ClientUpdate], name: str) -> torch.Tensor:
    total = sum(u.weight for u in updates)
    mean = torch.zeros_like(updates[0].lora[name][1])
    for update in updates:
        mean += (update.weight / total) * update.lora[name][1]
    return mean


def assert_is_the_svd_of(A: torch.Tensor, B: torch.Tensor, product: torch.Tensor) -> None:
    """(A, B) = (V_r^T, U_r S_r) of the dense `product`, each singular pair up to one sign flip."""
    U, S, Vh = torch.linalg.svd(product, full_matrices=False)
    rank = A.shape[0]
    signs = torch.sign((A * Vh[:rank]).sum(-1))  # +1 or -1 per component, the same for both factors
    torch.testing.assert_close(A, signs[:, None] * Vh[:rank], rtol=0, atol=1e-10)
    torch.testing.assert_close(B, U[:, :rank] * (signs * S[:rank]), rtol=0, atol=1e-10)


def test_a_refactoring_round_is_the_dense_svd_of_the_averaged_product_and_keeps_it():
    server, updates = server_and_updates()
    out = build_aggregator("fedsvd").aggregate(updates, like=server, round_index=1)
    for name, (A, _) in server.lora.items():
        product = mean_B(updates, name) @ A  # out x in, by hand
        new_A, new_B = out.lora[name]
        assert_is_the_svd_of(new_A, new_B, product)
        torch.testing.assert_close(new_B @ new_A, product, rtol=0, atol=1e-10)  # B A is unchanged
        torch.testing.assert_close(new_A @ new_A.T, torch.eye(RANK, dtype=A.dtype), rtol=0, atol=1e-12)
        norms = new_B.norm(dim=0)  # B's columns are U S: orthogonal, of decreasing norm
        torch.testing.assert_close(new_B.T @ new_B, torch.diag(norms**2), rtol=0, atol=1e-10)
        assert bool((norms[:-1] >= norms[1:]).all())
    total = sum(WEIGHTS)
    torch.testing.assert_close(out.extra["head.weight"], sum(u.weight / total * u.extra["head.weight"]
                                                             for u in updates))
    A_values = sum(RANK * fan_in for _, fan_in in SHAPES.values())
    B_values = sum(RANK * fan_out for fan_out, _ in SHAPES.values())
    head = 3 * 4
    assert out.bytes_up == (B_values + head) * 8  # B and the head up; both factors and the head down
    assert out.bytes_down == (A_values + B_values + head) * 8
    assert out.metrics["cos_avg_min"] == pytest.approx(1.0, abs=1e-12)  # B_bar A is the ideal update


@pytest.mark.parametrize(("period", "warmup", "refactoring"), [(1, 0, [1, 2, 3, 4, 5, 6, 7, 8]),
                                                                (2, 3, [5, 7]), (3, 1, [4, 7]), (1, 8, [])])
def test_the_refactor_comes_every_period_rounds_after_the_warmup_and_otherwise_B_is_averaged(period, warmup,
                                                                                            refactoring):
    server, updates = server_and_updates(seed=1)
    aggregator = build_aggregator("fedsvd", svd_period=period, svd_warmup=warmup)
    B_values = sum(RANK * fan_out for fan_out, _ in SHAPES.values()) + 3 * 4
    for round_index in range(1, 9):
        out = aggregator.aggregate(updates, like=server, round_index=round_index)
        for name, (A, _) in server.lora.items():
            new_A, new_B = out.lora[name]
            if round_index in refactoring:
                assert_is_the_svd_of(new_A, new_B, mean_B(updates, name) @ A)
            else:  # the server's A bit for bit, the mean of B; B only travels down
                assert torch.equal(new_A, A)
                torch.testing.assert_close(new_B, mean_B(updates, name), rtol=0, atol=1e-12)
        assert (out.bytes_down == B_values * 8) == (round_index not in refactoring)


def test_clients_train_and_send_B_only_and_one_that_changed_A_is_refused():
    rule = build_aggregator("fedsvd").client_rule(4)
    assert (rule.trains, rule.sends, rule.keeps, rule.frozen, rule.personal) == ("B", "B", "", "A", False)
    server, updates = server_and_updates(seed=2)
    A, B = updates[2].lora["blocks.0.mlp.fc2"]
    updates[2].lora["blocks.0.mlp.fc2"] = (A + 1e-9, B)
    with pytest.raises(ValueError, match=r"^fedsvd: client 2 sent a different A than client 0 for layer "
                                         r"'blocks\.0\.mlp\.fc2'; FedSVD clients train only B this round"):
        build_aggregator("fedsvd").aggregate(updates, like=server)


def test_clients_of_lower_ranks_start_from_the_leading_singular_components():
    """A rank-2 and a rank-1 client train with the leading rows of the shared A, in their own scaling alpha / r: the
    refactored pair means the exact weighted mean of the clients' updates, and a rank-r client starts from its best
    rank-r approximation (the top r singular components of the dense update)."""
    server, updates = server_and_updates(seed=3)
    own_ranks = (RANK, 2, 1, RANK)
    updates = [ClientUpdate(u.weight, {n: (A[:r].clone(), B[:, :r].clone()) for n, (A, B) in u.lora.items()}, u.extra)
               for u, r in zip(updates, own_ranks, strict=True)]
    out = build_aggregator("fedsvd").aggregate(updates, like=server, round_index=1)
    total = sum(WEIGHTS)
    for name in SHAPES:
        update = sum((u.weight / total) * (ALPHA / r) * (u.lora[name][1] @ u.lora[name][0])
                     for u, r in zip(updates, own_ranks, strict=True))
        A, B = out.lora[name]
        torch.testing.assert_close((ALPHA / RANK) * B @ A, update, rtol=0, atol=1e-10)
        U, S, Vh = torch.linalg.svd(update, full_matrices=False)
        for rank in (1, 2):
            A_r, B_r = out.lora_for(rank)[name]
            assert A_r.shape == (rank, SHAPES[name][1]) and B_r.shape == (SHAPES[name][0], rank)
            torch.testing.assert_close((ALPHA / rank) * B_r @ A_r, U[:, :rank] * S[:rank] @ Vh[:rank],
                                       rtol=0, atol=1e-10)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("svd_period", "0", "server.svd_period: must be an integer >= 1, got 0"),
    ("svd_warmup", "-1", "server.svd_warmup: must be an integer >= 0, got -1"),
])
def test_bad_options_are_refused_by_the_config(tmp_path, flag, value, message):
    with pytest.raises(ConfigError) as refused:
        parse_fit_args(tiny_args(tmp_path, "--server.method", "fedsvd", f"--server.{flag}", value))
    assert str(refused.value) == message


def test_in_a_run_the_next_round_starts_from_the_servers_refactored_pair(tmp_path):
    """Round 1 trains B from the run's start (B = 0) with A frozen; the server's answer is the SVD of the clients'
    mean B times that A; every client of round 2 starts from that answer, bit for bit, and leaves its A as it is."""
    cfg = tiny_config(tmp_path, "--server.method", "fedsvd")
    trainer, spy, results = spied_run(cfg)

    first, second = (record["clients"] for record in results["rounds"])
    initial = trainer.initial_state.lora
    for client in first:
        for name, (A, B) in spy.start[1, client].items():
            assert torch.equal(A, initial[name][0]) and not B.any()
        for name, (A, B) in spy.end[1, client].items():
            assert torch.equal(A, initial[name][0]) and B.any()  # A frozen, B trained
    total = sum(spy.weights[client] for client in first)
    for name, (A, B) in spy.answers[1].items():
        mean = sum(spy.weights[c] / total * spy.end[1, c][name][1].double() for c in first)
        product = mean @ initial[name][0].double()  # dense, by hand
        torch.testing.assert_close(B.double() @ A.double(), product, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(A.double() @ A.double().T, torch.eye(A.shape[0], dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        assert not torch.equal(A, initial[name][0])
    for client in second:
        for name, (A, B) in spy.start[2, client].items():
            assert torch.equal(A, spy.answers[1][name][0]) and torch.equal(B, spy.answers[1][name][1]), (client, name)
        for name, (A, _) in spy.end[2, client].items():
            assert torch.equal(A, spy.answers[1][name][0])
    head = (10 * 32 + 10) * 4
    B_bytes = sum(B.numel() * 4 for _, B in spy.answers[1].values())
    A_bytes = sum(A.numel() * 4 for A, _ in spy.answers[1].values())
    assert results["rounds"][0]["bytes_up"] == B_bytes + head
    assert results["rounds"][0]["bytes_down"] == A_bytes + B_bytes + head
    assert "personalised" not in results
