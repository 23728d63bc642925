"""The trainer with clients of different LoRA ranks (the tiny job, global rank 4, clients cycled over ranks 2 and 4):
a rank-2 client trains exactly a rank-2 LoRA with scaling alpha / 2 on the shared adapter, bytes follow ranks, bad
updates are dropped, and resume and torchrun keep their guarantees."""

from __future__ import annotations

import json

import pytest
import torch

from lorafair.aggregation import ClientUpdate, build_aggregator, method_class, registered_methods
from lorafair.config import ConfigError
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.fit import fit
from tests.helpers import (
    REDUCED_DEMO,
    ROOT,
    SEVERAL_PROCESSES,
    assert_same_trajectory,
    fit_in_subprocess,
    parse_fit_args,
    run_on_two_ranks,
    tiny_args,
    tiny_config,
)

pytestmark = SEVERAL_PROCESSES

MIXED = ("--lora.client_ranks", "[2, 4]")
"""Clients 0, 2, 4 train at rank 2, clients 1, 3, 5 at the global rank 4."""


@pytest.fixture(scope="module")
def mixed_round(tmp_path_factory):
    """A trainer of the mixed-rank tiny job (all 6 clients per round) and its round-1 client results."""
    cfg = tiny_config(tmp_path_factory.mktemp("mixed"), *MIXED, "--federation.clients_per_round", "null")
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    results = [trainer.client.train(client, trainer.global_state, 1, trainer.client_ranks[client.id])
               for client in trainer.data.clients]
    return trainer, results


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("mixed_run")
    return fit(tiny_config(out_dir, *MIXED))


def test_a_rank_2_client_trains_a_rank_2_lora_and_nothing_outside_it(mixed_round):
    trainer, results = mixed_round
    assert [trainer.client_ranks[r.client] for r in results] == [2, 4, 2, 4, 2, 4]
    model, client = trainer.model, trainer.data.clients[0]
    start = trainer.global_state.lora_for(2)
    update = trainer.client.train(client, trainer.global_state, 1, 2).update
    full = model.get_lora()  # train() leaves the adapter at the global rank: every component is visible
    for name, (A, B) in update.lora.items():
        assert A.shape[0] == B.shape[1] == 2
        assert torch.linalg.matrix_rank(B @ A) <= 2
        assert not torch.equal(A, start[name][0]) and not torch.equal(B, start[name][1])  # it did train
        assert not full[name][0][2:].any() and not full[name][1][:, 2:].any()
    # the adapter acts as a rank-2 LoRA with scaling alpha / 2 = 8 on the input of a layer
    name, (A, B) = next(iter(update.lora.items()))
    model.set_rank(2)
    model.set_lora(update.lora)
    layer = model.backbone.get_submodule(name)
    x = torch.randn(3, A.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ (16.0 / 2 * B @ A).T)
    model.set_rank(4)


def test_the_server_answers_at_the_global_rank_with_a_pair_for_rank_2_and_bytes_by_rank(mixed_round):
    trainer, results = mixed_round
    like = trainer.global_state
    only_rank_2 = [r for r in results if trainer.client_ranks[r.client] == 2]
    answer = trainer.aggregate(1, only_rank_2, [r.client for r in only_rank_2])
    assert all(A.shape[0] == 4 for A, _ in answer.lora.values()) and sorted(answer.by_rank) == [2]
    answer = trainer.aggregate(1, results, [r.client for r in results])
    per_rank = {rank: sum(rank * (A.shape[1] + B.shape[0]) * 4 for A, B in like.lora.values()) for rank in (2, 4)}
    head = sum(t.numel() * 4 for t in like.extra.values())
    for client, (up, _) in answer.record.bytes_by_client.items():
        assert up == per_rank[trainer.client_ranks[int(client)]] + head


def test_a_nan_rank_2_update_is_dropped_and_the_rest_aggregated_alone(mixed_round, capsys):
    trainer, results = mixed_round
    template = ClientUpdate(1.0, trainer.global_state.lora, trainer.global_state.extra)
    poisoned = [r.update for r in results]
    bad_A = next(iter(poisoned[2].lora.values()))[0]
    saved = bad_A.clone()
    bad_A[0, 0] = float("nan")
    try:
        answer = trainer.aggregate(1, results, [r.client for r in results])
    finally:
        bad_A.copy_(saved)
    assert "client 2" in capsys.readouterr().out
    alone = build_aggregator("lorafair", steps=50, seed=trainer.server.aggregator.seed).aggregate(
        [r.update for i, r in enumerate(results) if i != 2], like=template, lower_ranks=trainer.lower_ranks)
    for name, (A, B) in answer.lora.items():
        torch.testing.assert_close((A, B), alone.lora[name])
        torch.testing.assert_close(answer.by_rank[2][name], alone.by_rank[2][name])


@pytest.mark.slow
def test_a_mixed_rank_run_killed_in_round_2_resumes_exactly(mixed_run, tmp_path):
    killed = fit_in_subprocess(tiny_args(tmp_path, *MIXED), LORAFAIR_FAIL_AT="2:aggregate")
    assert killed.returncode != 0 and (tmp_path / "checkpoints").exists(), killed.stderr[-2000:]
    resumed = fit(tiny_config(tmp_path, *MIXED, "--resume", "auto"))
    assert_same_trajectory(resumed, mixed_run)


@pytest.mark.slow
def test_torchrun_with_two_ranks_matches_one_process_at_mixed_ranks(mixed_run, tmp_path):
    run_on_two_ranks(tiny_args(tmp_path, *MIXED))
    distributed = json.loads((tmp_path / "results.json").read_text())
    for domain, accuracy in mixed_run["final"]["accuracy"].items():
        assert abs(distributed["final"]["accuracy"][domain] - accuracy) <= 0.005
    for mine, theirs in zip(distributed["rounds"], mixed_run["rounds"], strict=True):
        assert (mine["clients"], mine["bytes_by_client"]) == (theirs["clients"], theirs["bytes_by_client"])


@pytest.mark.slow
@pytest.mark.parametrize("method", registered_methods())
def test_every_method_runs_the_hetero_demo(method, tmp_path):
    args = ["--config", str(ROOT / "configs" / "demo_hetero.yaml"), "--federation.rounds", "2",
            "--data.test_per_class", "5",
            "--client.max_local_steps", "2", "--server.method", method, "--server.steps", "20",
            "--out_dir", str(tmp_path)]
    if not method_class(method).mixed_ranks:  # refused before anything runs
        with pytest.raises(ConfigError, match=rf"^lora.client_ranks: {method} takes no clients of different ranks"):
            parse_fit_args(args)
        return
    results = fit(parse_fit_args(args))
    assert results["final"]["round"] == 2 and 0 < results["final"]["mean_accuracy"] <= 1
    sent = results["rounds"][-1]["bytes_by_client"]
    # clients 0 and 2 have ranks 2 and 8: client 0 sends a quarter of client 2's factors, and the same head
    assert sent["0"][0] * 4 == sent["2"][0] + head_bytes(results) * 3


def head_bytes(results: dict) -> int:
    """The classifier head (96 x 20 + 20 float32 for the 20 classes of the shapes benchmark) travels with every
    update."""
    return (96 * 20 + 20) * 4


def test_a_rank_2_client_of_a_language_model_trains_a_rank_2_lora_and_nothing_outside_it(tmp_path):
    """The text client masks ranks through the same shared LoRA state as the image client."""
    cfg = parse_fit_args([*REDUCED_DEMO, "--lora.client_ranks", "[2, 8]", "--out_dir", str(tmp_path)])
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    model, client = trainer.model, trainer.data.clients[0]
    assert trainer.client_ranks[client.id] == 2 and trainer.lower_ranks == (2,)
    frozen = {name: p.detach().clone() for name, p in model.backbone.named_parameters() if ".lora_" not in name}
    start = trainer.global_state.lora_for(2)
    update = trainer.client.train(client, trainer.global_state, 1, 2).update
    full = model.get_lora()  # back at the global rank 8
    for name, (A, B) in update.lora.items():
        assert A.shape[0] == B.shape[1] == 2 and torch.linalg.matrix_rank(B @ A) <= 2
        assert not torch.equal(B, start[name][1])  # it did train
        assert not full[name][0][2:].any() and not full[name][1][:, 2:].any()
    assert all(torch.equal(p, frozen[name]) for name, p in model.backbone.named_parameters() if name in frozen)
    name, (A, B) = next(iter(update.lora.items()))
    model.set_rank(2)
    model.set_lora(update.lora)
    layer, x = model.backbone.get_submodule(name), torch.randn(3, A.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ (cfg.lora.alpha / 2 * B @ A).T)
    model.set_rank(8)
