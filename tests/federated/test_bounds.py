"""Every run scores its starting model (round 0), and the two bounds a comparison measures methods against do what
they say: centralized trains one client on every client's samples, local never aggregates.

Expectations come from outside the trainer: a plain evaluation loop over the test sets, the client role called by
hand round after round, the clients' samples counted one by one."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorafair.data import build_federated_data, model_data_config
from lorafair.federated import faults
from lorafair.federated.bounds import local_steps, union_client
from lorafair.federated.checkpoints import load_checkpoint
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.federated.state import GlobalState, decode_items
from lorafair.fit import fit
from lorafair.keys import unpack_clients
from tests.helpers import items_right_by_hand, tiny_config


class Killed(Exception):
    """Stands for a kill in the middle of a round."""


def kill_in_round_2(monkeypatch) -> None:
    def fail(round_index: int, phase: str) -> None:
        if (round_index, phase) == (2, "train"):
            raise Killed

    monkeypatch.setattr(faults, "maybe_fail", fail)


def test_round_zero_is_the_pretrained_backbone_with_a_zero_lora_and_the_fresh_head(tiny_run, tmp_path):
    """The starting score equals a hand evaluation of the backbone with its LoRA B set to zero (so the adapters
    add nothing, whatever A is) and the model's freshly initialised head, item by item."""
    _, results = tiny_run
    trainer = FederatedTrainer(tiny_config(tmp_path), launch_fabric(tiny_config(tmp_path)))
    lora = {name: (torch.randn_like(a), torch.zeros_like(b)) for name, (a, b) in trainer.model.get_lora().items()}
    by_hand = items_right_by_hand(trainer, lora, trainer.model.get_extra())
    start = results["start"]
    assert start["round"] == 0
    assert start["accuracy"] == pytest.approx({domain: sum(right) / len(right) for domain, right in by_hand.items()})
    for domain, right in by_hand.items():
        assert decode_items(start["correct_items"][domain][0]).tolist() == right
    assert results["final"]["mean_gain"] == pytest.approx(results["final"]["mean_accuracy"] - start["mean_accuracy"])
    assert results["final"]["gain"]["plain"] == pytest.approx(results["final"]["accuracy"]["plain"]
                                                              - start["accuracy"]["plain"])


def test_round_zero_is_the_same_for_every_method_and_differs_with_the_seed(tiny_run, tmp_path):
    _, lorafair = tiny_run
    starts = [fit(tiny_config(tmp_path / method, "--server.method", method, "--federation.rounds", "1"))["start"]
              for method in ("fedit", "flora", "ffa_lora")]
    assert all(start == lorafair["start"] for start in starts)
    other_seed = fit(tiny_config(tmp_path / "seed1", "--seed", "1", "--federation.rounds", "1"))["start"]
    assert other_seed["correct_items"] != lorafair["start"]["correct_items"]


def test_round_zero_is_in_tensorboard_at_step_0_and_a_resumed_run_keeps_it(tiny_run, tmp_path, monkeypatch):
    """A run killed in round 2 and resumed: its results hold the round 0 it scored before the kill (the resumed
    process scores no other), equal to the uninterrupted run's."""
    _, uninterrupted = tiny_run
    kill_in_round_2(monkeypatch)
    with pytest.raises(Killed):
        fit(tiny_config(tmp_path))
    monkeypatch.undo()
    score_start = FederatedTrainer.score_start
    calls = []
    monkeypatch.setattr(FederatedTrainer, "score_start", lambda self: calls.append(1) or score_start(self))
    resumed = fit(tiny_config(tmp_path))
    assert calls == [] and resumed["start"] == uninterrupted["start"]
    assert resumed["final"] == uninterrupted["final"]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    mean = [(event.step, event.value) for event in events.Scalars("accuracy/mean")]
    assert mean[0] == (0, pytest.approx(uninterrupted["start"]["mean_accuracy"]))


def test_centralized_trains_one_client_on_every_clients_samples_for_their_steps_together(tmp_path):
    """5 of the 6 clients are sampled a round, each capped at 3 local steps: the one centralized client, holding
    every client's samples, trains 15 steps a round (not its own cap of 3)."""
    cfg = tiny_config(tmp_path, "--federation.setting", "centralized", "--federation.rounds", "1")
    data = build_federated_data(cfg.data, cfg.federation, cfg.seed, model_data_config(cfg.model, cfg.data.image_size))
    union = union_client(data.clients)
    samples = sorted((label, image.sum().item()) for client in data.clients
                     for image, label in (client.dataset[i] for i in range(len(client.dataset))))
    assert sorted((label, image.sum().item())
                  for image, label in (union.dataset[i] for i in range(len(union.dataset)))) == samples
    results = fit(cfg)
    assert results["method"] == "centralized"
    assert results["clients"] == [{"id": 6, "domain": "all", "num_samples": len(samples)}]
    assert results["rounds"][0]["train_steps"] == {"6": 5 * 3}
    assert local_steps(len(samples), cfg.data.batch_size, cfg.client) == 3
    assert results["rounds"][0]["bytes_up"] == 0


def test_local_never_aggregates_each_client_continues_its_own_state_and_scores_on_its_own_domain(tmp_path):
    """Each client's state after round 2 equals its own training from round 1's state, by the client role called
    by hand; the global state stays the start; a domain's score is its client's own model on its test set."""
    cfg = tiny_config(tmp_path, "--federation.setting", "local", "--federation.clients_per_round", "null")
    results = fit(cfg)
    assert results["method"] == "local" and results["rounds"][1]["bytes_up"] == 0
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    start = trainer.global_state
    saved = load_checkpoint(tmp_path / "checkpoints" / "round_00002.ckpt")
    for name, pair in saved["lora"].items():  # the global state never moved
        assert torch.equal(pair["A"], start.lora[name][0]) and torch.equal(pair["B"], start.lora[name][1])
    own = {client: GlobalState.from_tensors(tensors) for client, tensors in unpack_clients(saved["client_states"])
           .items()}
    assert sorted(own) == list(range(6))
    for client in trainer.data.clients:
        state = start
        for round_index in (1, 2):
            update = trainer.client.train(client, state, round_index).update
            state = GlobalState(update.lora, update.extra)
        for name, (a, b) in state.lora.items():
            torch.testing.assert_close(own[client.id].lora[name][0], a, rtol=0, atol=0)
            torch.testing.assert_close(own[client.id].lora[name][1], b, rtol=0, atol=0)
        right = items_right_by_hand(trainer, state.lora, state.extra)[client.domain]
        assert results["final"]["accuracy"][client.domain] == pytest.approx(sum(right) / len(right))


def test_a_local_run_killed_in_round_2_resumes_with_each_clients_own_state(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "whole", "--federation.setting", "local")
    uninterrupted = fit(cfg)
    kill_in_round_2(monkeypatch)
    with pytest.raises(Killed):
        fit(tiny_config(tmp_path / "killed", "--federation.setting", "local"))
    monkeypatch.undo()
    resumed = fit(tiny_config(tmp_path / "killed", "--federation.setting", "local"))
    assert resumed["final"] == uninterrupted["final"]
    assert json.loads(json.dumps(resumed["start"])) == uninterrupted["start"]


def test_local_is_refused_for_clients_without_a_domain(tmp_path):
    from lorafair.config import ConfigError

    with pytest.raises(ConfigError, match=r"federation\.setting"):
        tiny_config(tmp_path, "--federation.setting", "local", "--federation.partition", "iid").validate()
