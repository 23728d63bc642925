"""`lorafair flower`'s apps with methods whose clients do more than train the round's factors, against `lorafair fit`
with the same config and seed, on the in-process grid of `test_app_client_rules` (seconds, no Ray):

- HetLoRA with rank self-pruning: a node trains with the method's penalty, decides the rank it keeps, uploads its
  update at that rank and announces it; the server lowers the client's rank only once the round keeps the update.
- FedDPA: a node trains a local adapter of its own first, keeps it (and the summary of its training inputs) in its
  node state, never sends it, and scores its own model mixing it in; the server scores and exports the global model.

Client 2's round-2 update is NaN, so the server drops it: under HetLoRA its rank must stay, under FedDPA its node
must go back to the local adapter it held before.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image
from safetensors.torch import load_file

from lorafair.cli import main
from lorafair.federated.checkpoints import list_checkpoints, load_checkpoint
from lorafair.federated.state import is_local
from lorafair.flower.app import RANK, FlowerRoundLoop, make_client_app, run_server, to_arrays
from lorafair.flower.records import LOCAL_SETTINGS, OWN, PENDING
from lorafair.keys import unpack_clients
from tests.flower.test_app_client_rules import InProcessGrid
from tests.helpers import tiny_args, tiny_config

POISONED = "2:2"
"""Round 2, client 2."""
THREE_DOMAINS = ["--data.domains", "[plain,inverted,rotated]", "--cpu_threads", "1"]
PRUNING = ["--server.method", "hetlora", "--server.prune_gamma", "0.5", "--server.prune_penalty", "5",
           "--server.prune_threshold", "1.5"]
"""Rank 4 keeps 2 components when its tail ends below 1.5 times the one it started from: with a penalty of 5, every
client's does in round 2 (in round 1 B starts at zero, so there is no tail to shrink)."""
HETLORA_JOB = [*THREE_DOMAINS, *PRUNING, "--federation.clients_per_round", "3"]
FEDDPA_JOB = [*THREE_DOMAINS, "--server.method", "feddpa", "--federation.clients_per_round", "2",
              "--federation.rounds", "3"]
"""Seed 0 samples clients 1, 2; 0, 2; 1, 2: client 0 starts round 2 from the initial local adapter."""


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def results(run) -> dict:
    return json.loads((run / "results.json").read_text())


def assert_rounds_equal(flower: dict, fit: dict, rounds: list[int]) -> None:
    """The rounds `rounds` of two results.json: the same clients, dropped updates, train losses, bytes per client
    (which follow each client's rank) and scores, the global model's and the clients' own."""
    ours_by_round = {record["round"]: record for record in flower["rounds"]}
    for reference in fit["rounds"]:
        if reference["round"] not in rounds:
            continue
        ours = ours_by_round[reference["round"]]
        assert ours["clients"] == reference["clients"]
        assert ours["bad_updates"].keys() == reference["bad_updates"].keys()
        assert ours["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
        assert ours["bytes_by_client"] == reference["bytes_by_client"]
        assert ours["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-12)
        assert ("personalised" in ours) == ("personalised" in reference)
        if "personalised" in reference:
            assert ours["personalised"]["accuracy"] == pytest.approx(reference["personalised"]["accuracy"], abs=1e-12)


def sent_ranks(grid: InProcessGrid, round_index: int) -> dict[int, tuple[int, int | None]]:
    """Client -> (the rank its round's train message names, the rank its reply announces)."""
    return {message.metadata.dst_node_id - 10: (message.content["config"][RANK],
                                                reply.content["metrics"].get(RANK))
            for message, reply in grid.of_type(MessageType.TRAIN)
            if message.content["config"]["server-round"] == round_index}


def test_hetlora_nodes_prune_their_own_rank_as_fit_and_a_dropped_update_lowers_no_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFAIR_POISON", POISONED)
    assert main(["fit", *tiny_args(tmp_path / "fit", *HETLORA_JOB, "--federation.rounds", "3")]) == 0
    cfg = tiny_config(tmp_path / "flower", *HETLORA_JOB, "--federation.rounds", "3")
    grid = InProcessGrid(make_client_app(lambda _: cfg), 3)
    flower, fit = run_server(cfg, grid, timeout=60), results(tmp_path / "fit")
    assert_rounds_equal(flower, fit, [1, 2, 3])
    assert flower["final"]["mean_accuracy"] == pytest.approx(fit["final"]["mean_accuracy"], abs=1e-12)

    # round 1 starts from B = 0 (no tail): nobody prunes; in round 2 every node prunes to 2, but client 2's update
    # is dropped, so only clients 0 and 1 train at rank 2 in round 3
    assert sent_ranks(grid, 1) == {0: (4, 4), 1: (4, 4), 2: (4, 4)}
    assert sent_ranks(grid, 2) == {0: (4, 2), 1: (4, 2), 2: (4, 2)}
    assert list(flower["rounds"][1]["bad_updates"]) == ["2"]
    assert {client: sent for client, (sent, _) in sent_ranks(grid, 3).items()} == {0: 2, 1: 2, 2: 4}
    for _, reply in grid.of_type(MessageType.TRAIN):  # each reply is at the rank it announces
        announced = reply.content["metrics"][RANK]
        assert all(tensor.shape[0] == announced for key, tensor in reply.content["arrays"].items()
                   if key.endswith("/A"))
    fit_ranks, flower_ranks = (load_checkpoint(list_checkpoints(tmp_path / run / "checkpoints")[-1])["client_ranks"]
                               for run in ("fit", "flower"))
    assert fit_ranks == flower_ranks == {0: 2, 1: 2, 2: 4}


def test_a_resumed_flower_run_of_hetlora_takes_back_the_pruned_ranks(tmp_path, monkeypatch):
    """Two rounds, then the same run resumed for a third on new nodes: round 3 as in one run of `fit`."""
    monkeypatch.setenv("LORAFAIR_POISON", POISONED)
    assert main(["fit", *tiny_args(tmp_path / "fit", *HETLORA_JOB, "--federation.rounds", "3")]) == 0
    first = tiny_config(tmp_path / "flower", *HETLORA_JOB, "--federation.rounds", "2")
    run_server(first, InProcessGrid(make_client_app(lambda _: first), 3), timeout=60)
    resumed = tiny_config(tmp_path / "flower", *HETLORA_JOB, "--federation.rounds", "3")
    grid = InProcessGrid(make_client_app(lambda _: resumed), 3)
    flower = run_server(resumed, grid, timeout=60)
    assert [message.content["config"]["server-round"] for message, _ in grid.of_type(MessageType.TRAIN)] == [3] * 3
    assert {client: sent for client, (sent, _) in sent_ranks(grid, 3).items()} == {0: 2, 1: 2, 2: 4}
    assert_rounds_equal(flower, results(tmp_path / "fit"), [1, 2, 3])


class ScriptedGrid:
    """A grid whose nodes 10 + client id answer a round with `answer(message)`."""

    def __init__(self, answer):
        self.answer = answer

    def send_and_receive(self, messages, timeout):
        return [self.answer(message) for message in messages]


def reply_at(message: Message, tensors: dict, rank: int, announced: int | None) -> Message:
    """A well-formed train reply of `tensors` (the global state) cut to `rank`, announcing `announced` (None: no
    announcement)."""
    cut = {key: (tensor[:rank] if key.endswith("/A") else tensor[:, :rank] if key.endswith("/B") else tensor)
           for key, tensor in tensors.items()}
    metrics = {"num-examples": 7, "train-loss": 0.5, "steps": 3, "skipped-images": 0}
    metrics.update({} if announced is None else {RANK: announced})
    return Message(RecordDict({"arrays": to_arrays(cut), "metrics": MetricRecord(metrics)}), reply_to=message)


# client -> (the rank its reply is at, the rank it announces)
REPLIES = {0: (4, 4), 1: (2, 2), 2: (2, 4), 3: (2, None), 4: (4, 8), 5: (4, 0)}


def test_a_reply_at_a_rank_its_node_did_not_announce_is_dropped_as_malformed(tmp_path):
    cfg = tiny_config(tmp_path, *PRUNING)
    tensors = {}
    loop = FlowerRoundLoop(cfg, ScriptedGrid(lambda message: reply_at(
        message, tensors, *REPLIES[message.metadata.dst_node_id - 10])), timeout=3)
    tensors.update(loop.global_state.tensors())
    loop.node_of = {client: 10 + client for client in range(6)}
    results, _, _ = loop.train_clients(1, list(REPLIES))
    assert [result.client for result in results] == [0, 1] and loop.pruned == {1: 2}
    assert results[1].update.lora["blocks.0.attn.proj"][0].shape == (2, 32)
    assert sorted(loop.malformed) == ["2", "3", "4", "5"]
    assert "array 'lora/blocks.0.attn.proj/A' has shape (2, 32), the global model's is (4, 32)" in loop.malformed["2"]
    for client, announced in (("3", None), ("4", 8), ("5", 0)):
        assert f"its metric 'lora-rank' is {announced}, not the client's LoRA rank 4 or a lower one" in \
            loop.malformed[client]
    answer = loop.aggregate(1, results, list(REPLIES))
    loop.apply(1, answer)
    assert answer.record.bad_updates.keys() == {"2", "3", "4", "5"}
    assert loop.client_ranks[1] == 2 and loop.client_ranks[2] == 4  # the kept pruned update lowers its client's rank


def test_without_self_pruning_a_lower_rank_reply_is_malformed_even_when_announced(tmp_path):
    cfg = tiny_config(tmp_path, "--server.method", "hetlora")
    tensors = {}
    loop = FlowerRoundLoop(cfg, ScriptedGrid(lambda message: reply_at(message, tensors, 2, 2)), timeout=3)
    tensors.update(loop.global_state.tensors())
    loop.node_of = {client: 10 + client for client in range(6)}
    results, _, _ = loop.train_clients(1, [0])
    assert results == [] and "has shape (2, 32), the global model's is (4, 32)" in loop.malformed["0"]


class RecordingGrid(InProcessGrid):
    """Also keeps, after every evaluate message, what each node keeps of its own (its node state's OWN)."""

    def __init__(self, app, clients):
        super().__init__(app, clients)
        self.own_after: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def send_and_receive(self, messages, timeout):
        replies = super().send_and_receive(messages, timeout)
        for message in messages:
            state = self.contexts[message.metadata.dst_node_id].state
            if message.metadata.message_type == MessageType.EVALUATE and OWN in state:
                self.own_after[message.content["config"]["server-round"], message.metadata.dst_node_id - 10] = \
                    state[OWN].to_torch_state_dict()
        return replies


def test_feddpa_nodes_keep_their_local_adapter_which_never_travels_and_score_both_models_as_fit(tmp_path, monkeypatch,
                                                                                               capsys):
    monkeypatch.setenv("LORAFAIR_POISON", POISONED)
    assert main(["fit", *tiny_args(tmp_path / "fit", *FEDDPA_JOB)]) == 0
    cfg = tiny_config(tmp_path / "flower", *FEDDPA_JOB)
    grid = RecordingGrid(make_client_app(lambda _: cfg), 3)
    flower, fit = run_server(cfg, grid, timeout=60), results(tmp_path / "fit")
    assert [r["clients"] for r in flower["rounds"]] == [[1, 2], [0, 2], [1, 2]]
    assert_rounds_equal(flower, fit, [1, 2, 3])
    assert list(flower["rounds"][1]["bad_updates"]) == ["2"]
    for key in ("correct_items", "personalised"):
        assert flower["rounds"][2][key] == fit["rounds"][2][key]
    assert "global_model" not in flower["final"] and all("global_model" not in r for r in flower["rounds"])
    assert flower["final"]["mean_accuracy"] == pytest.approx(fit["final"]["mean_accuracy"], abs=1e-12)
    assert flower["personalised"]["mean_accuracy"] == pytest.approx(fit["personalised"]["mean_accuracy"], abs=1e-12)

    # no local adapter in any message or reply; every message names the adapter's settings
    assert len(grid.of_type(MessageType.EVALUATE)) == 3 * 3
    for message, reply in grid.of_type(MessageType.TRAIN) + grid.of_type(MessageType.EVALUATE):
        keys = [key for content in (message.content, reply.content) for record in content.array_records.values()
                for key in record]
        assert keys and not any(is_local(key) or "local" in key for key in keys)
        assert [message.content["config"][key] for key in LOCAL_SETTINGS] == [0.5, 0.5, 5]

    # the dropped round-2 update: node 2 went back to its round-1 local adapter; node 0 kept its round-2 one
    own = grid.own_after
    assert (1, 0) not in own and all(torch.equal(own[1, 2][key], own[2, 2][key]) for key in own[1, 2])
    assert not all(torch.equal(own[2, 2][key], own[3, 2][key]) for key in own[2, 2])
    # what each node holds at the end is what fit's last checkpoint holds of its client: local adapter and summary
    fit_states = unpack_clients(load_checkpoint(list_checkpoints(tmp_path / "fit" / "checkpoints")[-1])
                                ["client_states"])
    for node, context in grid.contexts.items():
        assert PENDING not in context.state
        held = context.state[OWN].to_torch_state_dict()
        assert held.keys() == fit_states[node - 10].keys() and all(is_local(key) for key in held)
        for key, tensor in held.items():
            torch.testing.assert_close(tensor, fit_states[node - 10][key], rtol=0, atol=0)

    # the global model is exported as fit's, and the run folder serves export, evaluate and predict
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        exported, reference = (load_file(tmp_path / run / "final" / name) for run in ("flower", "fit"))
        assert exported.keys() == reference.keys()
        for key, tensor in exported.items():
            torch.testing.assert_close(tensor, reference[key], rtol=0, atol=1e-6)
    image = tmp_path / "image.png"
    Image.new("RGB", (16, 16)).save(image)
    run = str(tmp_path / "flower")
    for command in (["export", "--run", run, "--round", "3", "--out", str(tmp_path / "again")],
                    ["evaluate", "--run", run], ["predict", "--run", run, str(image)]):
        assert main(command) == 0, command
    capsys.readouterr()
    assert main(["export", "--run", run, "--client", "0"]) == 2  # refused, as fit's run refuses it
    assert "mix a local adapter of their own with the global one" in capsys.readouterr().err
