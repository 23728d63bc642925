"""HetLoRA: clients of different ranks, zero-padded to the largest, averaged with weights proportional to the norm of
each client's update, each client sent its leading components.

Expectations come another way than the code: each client's update formed densely in its own scaling alpha / r_k and
its norm taken from that out x in matrix (the code uses r x r products in the server's scaling), padding by hand,
and the dense reference of `lorafair.aggregation.reference`. Rank self-pruning: the penalty's gradient worked by
hand on a tiny pair, the pruning rule on pairs whose tails are scaled by hand, and in runs each client's tail norms
taken from the model's own parameters at its first step and its trained update."""

from __future__ import annotations

import pytest
import torch

from lorafair.aggregation import ClientUpdate, build_aggregator
from lorafair.aggregation.reference import dense_reference
from lorafair.config import ConfigError
from lorafair.federated.checkpoints import load_checkpoint
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.fit import fit
from lorafair.flower.strategy import strategy_refusal
from tests.helpers import Spy, parse_fit_args, tiny_args, tiny_config

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


# ---- rank self-pruning ---------------------------------------------------------------------------------------------

PRUNING = ("--server.method", "hetlora", "--server.prune_gamma", "0.5", "--server.prune_penalty", "10",
           "--federation.rounds", "3")
"""The tiny job (rank 4) with rank self-pruning: a client keeps 2 components when it prunes; round 1 starts from
B = 0 (no tail, so no pruning), round 2 from the server's pair."""


def test_the_penalty_and_its_gradient_are_the_hand_computed_ones():
    """gamma 0.5 at rank 3 keeps floor(1.5) = 1 component; the tails are A[1:] and B[:, 1:], of norm 5 each in layer
    a, 10 and 5 in layer b. d(lam ||B_t|| ||A_t||)/dA_t = lam ||B_t|| A_t / ||A_t||, and alike for B_t; the kept
    components get no gradient."""
    B = torch.tensor([[9.0, 0.0, 3.0], [9.0, 4.0, 0.0]])
    pairs = {"a": (torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]), B),
             "b": (torch.tensor([[2.0, 4.0], [6.0, 8.0], [0.0, 0.0]]), B)}
    live = {name: (A.clone().requires_grad_(), B.clone().requires_grad_()) for name, (A, B) in pairs.items()}
    penalty = build_aggregator("hetlora", prune_gamma=0.5, prune_penalty=0.1).client_penalty(live)
    assert penalty.item() == pytest.approx(0.1 * (5 * 5 + 10 * 5))
    penalty.backward()
    expected = {"a": ([[0.0, 0.0], [0.3, 0.4], [0.0, 0.0]], [[0.0, 0.0, 0.3], [0.0, 0.4, 0.0]]),
                "b": ([[0.0, 0.0], [0.3, 0.4], [0.0, 0.0]], [[0.0, 0.0, 0.6], [0.0, 0.8, 0.0]])}
    for name, (A, B) in live.items():
        torch.testing.assert_close(A.grad, torch.tensor(expected[name][0]))
        torch.testing.assert_close(B.grad, torch.tensor(expected[name][1]))
    # no tail at rank 1 (a client keeps at least one component), and no penalty off
    rank_one = {"a": (live["a"][0][:1], live["a"][1][:, :1])}
    assert build_aggregator("hetlora", prune_gamma=0.5, prune_penalty=0.1).client_penalty(rank_one) is None
    assert build_aggregator("hetlora", prune_gamma=0.5).client_penalty(live) is None


@pytest.mark.parametrize(("threshold", "prunes"), [(0.6, True), (0.5, False), (0.4, False)])
def test_a_client_prunes_only_when_its_tail_fell_below_the_threshold(threshold, prunes):
    """The trained tail is the starting one with A's tail halved: the tail norm is exactly half of what it was."""
    start = updates_at((RANK,) * 5)[0].lora
    trained = {}
    for name, (A, B) in start.items():
        A_trained = A.clone()
        A_trained[2:] *= 0.5
        trained[name] = (A_trained, B + 1.0)  # a change of the kept components does not count
        trained[name][1][:, 2:] = B[:, 2:]
    aggregator = build_aggregator("hetlora", prune_gamma=0.5, prune_threshold=threshold)
    assert aggregator.pruned_rank(start, trained) == (2 if prunes else RANK)
    assert build_aggregator("hetlora").pruned_rank(start, {n: (0 * A, 0 * B) for n, (A, B) in start.items()}) == RANK


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("prune_gamma", "0", "server.prune_gamma: must be a number in (0, 1], got 0.0"),
    ("prune_gamma", "1.5", "server.prune_gamma: must be a number in (0, 1], got 1.5"),
    ("prune_penalty", "-1", "server.prune_penalty: must be a finite number >= 0, got -1.0"),
    ("prune_threshold", "0", "server.prune_threshold: must be a finite number > 0, got 0.0"),
    ("prune_penalty", "0.5", "server.prune_penalty: must be 0 while prune_gamma is 1, which leaves no components "
                             "to penalise (lower prune_gamma or drop prune_penalty), got 0.5"),
])
def test_bad_pruning_options_are_refused_by_the_config(tmp_path, flag, value, message):
    with pytest.raises(ConfigError) as refused:
        parse_fit_args(tiny_args(tmp_path, "--server.method", "hetlora", f"--server.{flag}", value))
    assert str(refused.value) == message


def test_lora_strategy_refuses_pruning_alone_and_names_lorafair_flower():
    """lorafair flower prunes (tests/flower/test_app_node_state.py); LoraStrategy takes HetLoRA only without it."""
    assert strategy_refusal("hetlora") is None
    refusal = strategy_refusal("hetlora", {"prune_gamma": 0.5})
    assert refusal.startswith("hetlora with rank self-pruning (server.prune_gamma below 1) cannot run in "
                              "LoraStrategy") and "run it with lorafair flower" in refusal


def tails(pairs: dict, kept: int) -> float:
    """sum over layers of ||B[:, kept:]|| ||A[kept:]||, by hand."""
    return sum(float(torch.linalg.norm(B[:, kept:]) * torch.linalg.norm(A[kept:])) for A, B in pairs.values())


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_in_a_run_a_client_whose_tail_shrank_prunes_and_gets_its_leading_components_next_round(tmp_path, threshold):
    """Every step adds the penalty of the model's live pairs at the client's rank. A client of round 2 prunes to
    rank 2 exactly when its tail norm, from its parameters at its first step and its trained update, fell below
    threshold times where it started; it uploads its leading 2 components (the round's answer is HetLoRA's average of
    those, formed from the trained updates by hand) and starts round 3 from the leading 2 components of the answer.
    A client that did not prune (or did not train in round 2) stays at rank 4."""
    cfg = tiny_config(tmp_path, *PRUNING, "--server.prune_threshold", str(threshold))
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    spy, penalties, penalty = Spy(trainer), [], trainer.server.aggregator.client_penalty

    def recording(lora):
        A, B = next(iter(lora.values()))
        penalties.append((A.shape[0], B.shape[1], A.requires_grad and B.requires_grad))
        return penalty(lora)

    trainer.server.aggregator.client_penalty = recording
    results = trainer.run()
    steps = sum(sum(record["train_steps"].values()) for record in results["rounds"])
    assert len(penalties) == steps and all(trains for _, _, trains in penalties)  # every step, live parameters
    assert {(a, b) for a, b, _ in penalties} == ({(4, 4), (2, 2)} if threshold == 1.0 else {(4, 4)})

    ranks, pruned = dict.fromkeys(range(6), 4), {}
    for record in results["rounds"]:  # each client's rank replayed from its tails, round by round
        pruned[record["round"]] = set()
        for client in record["clients"]:
            start, end, rank = spy.start[record["round"], client], spy.end[record["round"], client], ranks[client]
            assert {A.shape[0] for A, _ in start.values()} == {rank}
            kept = max(1, rank // 2)
            if kept < rank and tails(end, kept) < threshold * tails(start, kept):
                ranks[client] = kept
                pruned[record["round"]].add(client)
    assert trainer.client_ranks == ranks
    assert not pruned[1]  # round 1 starts from B = 0: no tail to shrink
    assert (len(pruned[2]) > 0) == (threshold == 1.0)  # the penalty shrinks each tail by about 5 %
    round_2, pruned = results["rounds"][1]["clients"], pruned[2]
    uploads = [ClientUpdate(spy.weights[c], {name: (A[:2], B[:, :2] * 2 / 4) if c in pruned else (A, B)
                                            for name, (A, B) in spy.end[2, c].items()}) for c in round_2]
    expected = build_aggregator("hetlora").aggregate(uploads, like=ClientUpdate(1.0, spy.states[1].lora))
    for name, pair in expected.lora.items():
        torch.testing.assert_close(spy.answers[2][name], pair, rtol=1e-5, atol=1e-7)
    for client in results["rounds"][2]["clients"]:
        rank = 2 if client in pruned else 4
        for name, (A, B) in spy.start[3, client].items():
            answer_A, answer_B = spy.answers[2][name]
            torch.testing.assert_close((A, B), (answer_A[:rank], answer_B[:, :rank] * rank / 4), rtol=0, atol=0)
    sent = [record["bytes_by_client"] for record in results["rounds"]]
    for client in set(round_2) & set(results["rounds"][0]["clients"]):
        assert (sent[1][str(client)][0] < sent[0][str(client)][0]) == (client in pruned)


def test_a_pruning_run_stopped_after_round_2_resumes_with_each_clients_pruned_rank(tmp_path):
    """The ranks clients pruned to travel through the checkpoint: a resumed round 3 trains each client at its own
    rank, as the uninterrupted run does (same losses, same bytes per client, same final pair)."""
    whole = fit(tiny_config(tmp_path / "whole", *PRUNING))
    fit(tiny_config(tmp_path / "resumed", *PRUNING, "--federation.rounds", "2"))
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "round_00002.ckpt")["client_ranks"]
    assert 2 in saved.values() and set(saved) == set(range(6))  # some client pruned before the interruption
    resumed = fit(tiny_config(tmp_path / "resumed", *PRUNING, "--resume", "auto"))
    assert resumed["final"] == whole["final"]
    for key in ("train_loss", "bytes_by_client"):
        assert [r[key] for r in resumed["rounds"]] == [r[key] for r in whole["rounds"]]
    ours, theirs = (load_checkpoint(tmp_path / run / "checkpoints" / "round_00003.ckpt")
                    for run in ("resumed", "whole"))
    assert ours["client_ranks"] == theirs["client_ranks"]
    assert all(torch.equal(ours["lora"][name][f], theirs["lora"][name][f]) for name in ours["lora"] for f in "AB")
