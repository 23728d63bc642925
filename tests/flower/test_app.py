"""`lorafair flower` on Flower's simulation engine against `lorafair fit` with the same config and seed.

FLoRA with 5 of 6 clients per round: the ClientApp must catch up with merges of rounds its node sat out. One client
fails in round 2; Flower hands the server an error reply and the round goes on with the others. The same job under
`fit`, with that client's update poisoned (so fit drops it and re-weights the rest), is the reference.
"""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import psutil
import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lorafair.cli import main
from lorafair.flower.app import BASE, LOCAL_RAY, MERGES, FlowerRoundLoop, catch_up, to_arrays
from lorafair.keys import pack_pairs
from tests.helpers import SEVERAL_PROCESSES, tiny_args, tiny_config

pytestmark = [pytest.mark.slow, SEVERAL_PROCESSES]

FAILING = "2:1"
"""Round 2, client 1: a client that trains in that round (the tiny job samples clients 0, 1, 3, 4, 5)."""


@pytest.mark.parametrize("method", [["--server.method", "flora"],
                                    ["--server.method", "lorafair", "--lora.client_ranks", "[2, 4, 1]"],
                                    ["--server.method", "frlora"]],
                         ids=["flora", "lorafair-mixed-ranks", "frlora"])
def test_flower_simulation_equals_fit(tmp_path, monkeypatch, method):
    """FLoRA restarts from fresh LoRA and merges; LoRA-FAIR at ranks 2, 4, 1 sends each client its rank's pair;
    FRLoRA's nodes take the start as the run's first merge (client 3 with round 1's, in round 2)."""
    monkeypatch.setenv("LORAFAIR_POISON", FAILING)
    assert main(["fit", *tiny_args(tmp_path / "fit", *method)]) == 0
    monkeypatch.delenv("LORAFAIR_POISON")
    monkeypatch.setenv("LORAFAIR_CLIENT_ERROR", FAILING)
    assert main(["flower", *tiny_args(tmp_path / "flower", *method)]) == 0
    fit, flower = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("fit", "flower"))

    assert [r["clients"] for r in flower["rounds"]] == [r["clients"] for r in fit["rounds"]]
    assert [3 in r["clients"] for r in flower["rounds"]] == [False, True]  # client 3 catches up with round 1's merge
    for ours, reference in zip(flower["rounds"], fit["rounds"], strict=True):
        # same float32 operations in the same order on one CPU thread: equal, up to summation-order noise
        assert ours["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-12)
        assert ours["bytes_by_client"] == reference["bytes_by_client"]
        dropped = set(reference["bad_updates"])
        assert ours["train_loss"] == pytest.approx({c: loss for c, loss in reference["train_loss"].items()
                                                    if c not in dropped}, rel=1e-6)
    (reason,) = flower["rounds"][1]["failed_clients"].values()
    assert list(flower["rounds"][1]["failed_clients"]) == ["1"] and "client 1 fails in round 2" in reason
    assert flower["rounds"][0]["failed_clients"] == {} == fit["rounds"][1]["failed_clients"]
    bytes_up = {up for round_ in flower["rounds"] for up, _ in round_["bytes_by_client"].values()}
    assert len(bytes_up) == (3 if "--lora.client_ranks" in method else 1)  # each client's bytes follow its rank
    assert flower["final"]["mean_accuracy"] == pytest.approx(fit["final"]["mean_accuracy"], abs=1e-12)
    assert (tmp_path / "flower" / "checkpoints").is_dir() and list((tmp_path / "flower" / "tensorboard").iterdir())


def test_flower_simulation_of_fedsa_lora_keeps_each_nodes_b_across_rounds_as_fit(tmp_path):
    """Two nodes, one per round, three rounds: each node's B lives in the node state Flower's simulation engine keeps
    between rounds (a node sits out rounds); the personalised scores equal fit's, the global model's are not
    available."""
    job = ["--data.domains", "[plain,inverted]", "--federation.clients_per_round", "1", "--federation.rounds", "3",
           "--server.method", "fedsa_lora", "--seed", "3"]  # seed 3 samples client 0, then 1, then 1
    assert main(["fit", *tiny_args(tmp_path / "fit", *job)]) == 0
    assert main(["flower", *tiny_args(tmp_path / "flower", *job)]) == 0
    fit, flower = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("fit", "flower"))
    assert [r["clients"] for r in flower["rounds"]] == [r["clients"] for r in fit["rounds"]]
    assert [r["clients"] for r in fit["rounds"]] == [[0], [1], [1]]
    for ours, reference in zip(flower["rounds"], fit["rounds"], strict=True):
        assert ours["personalised"]["accuracy"] == pytest.approx(reference["personalised"]["accuracy"], abs=1e-12)
        assert ours["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
        assert "accuracy" not in ours and ours["global_model"].startswith("not available under Flower")
    assert flower["personalised"]["mean_accuracy"] == pytest.approx(fit["personalised"]["mean_accuracy"], abs=1e-12)


class FrozenWeights:
    """What catch_up needs of a model: frozen weights that a merge (A, B) adds B @ A to."""

    def __init__(self, base):
        self.base = {name: tensor.clone() for name, tensor in base.items()}

    def load_base_state(self, state):
        self.base = {name: tensor.clone() for name, tensor in state.items()}

    def base_state(self):
        return {name: tensor.clone() for name, tensor in self.base.items()}

    def merge(self, merge):
        for name, (lora_a, lora_b) in merge.items():
            self.base[name] += lora_b @ lora_a


def test_a_node_catches_up_with_missed_merges_and_takes_a_resumed_runs_frozen_weights(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    generator = torch.Generator().manual_seed(0)
    merges = [{"layer": (torch.randn(1, 2, generator=generator), torch.randn(3, 1, generator=generator))}
              for _ in range(4)]
    pristine = {"layer": torch.randn(3, 2, generator=generator)}

    def message(log, start, base=None):
        content = RecordDict({MERGES: to_arrays({key: tensor for index in range(start, len(log))
                                                 for key, tensor in pack_pairs(f"merge/{index}", log[index]).items()})})
        if base is not None:
            content[BASE] = to_arrays(base)
        return Message(content, dst_node_id=5, message_type=MessageType.TRAIN)

    def node():
        return SimpleNamespace(model=FrozenWeights(pristine)), Context(1, 5, {"partition-id": 0}, RecordDict(), {})

    def weights_after(base, applied):
        return base["layer"] + sum(b @ a for a, b in (merge["layer"] for merge in applied))

    trainer, context = node()
    catch_up(trainer, pristine, message(merges[:2], 0), context)  # sat out rounds: both merges so far
    assert torch.allclose(trainer.model.base["layer"], weights_after(pristine, merges[:2]))
    trainer.model.load_base_state(pristine)  # another node used the shared model meanwhile
    catch_up(trainer, pristine, message(merges[:3], 1), context)  # merge 1 again (its confirmation was lost)
    assert torch.allclose(trainer.model.base["layer"], weights_after(pristine, merges[:3]))
    with pytest.raises(ValueError, match=r"merges \[4\] do not continue from the 3"):
        catch_up(trainer, pristine, message([*merges, merges[0]], 4), context)

    resumed = {"layer": weights_after(pristine, merges[:3])}
    trainer, context = node()  # a new Flower run resumes: the node starts from the checkpoint's weights
    catch_up(trainer, pristine, message(merges[3:], 0, base=resumed), context)
    assert torch.allclose(trainer.model.base["layer"], weights_after(pristine, merges))


class ScriptedGrid:
    """A grid whose nodes 10 + client id answer a round with `answer(message)` (a reply, or None for silence)."""

    def __init__(self, answer):
        self.answer, self.sent = answer, []

    def send_and_receive(self, messages, timeout):
        self.sent += list(messages)
        return [reply for reply in map(self.answer, messages) if reply is not None]


def test_the_server_leaves_out_a_failed_node_and_a_silent_one_and_records_both(tmp_path, monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = tiny_config(tmp_path, "--server.method", "fedit")
    update = {}

    def answer(message):
        client = message.metadata.dst_node_id - 10
        if client == 1:
            return Message(Error(code=0, reason="node lost"), reply_to=message)
        metrics = MetricRecord({"num-examples": 7, "train-loss": 0.5, "steps": 3, "skipped-images": 0})
        return None if client == 2 else Message(RecordDict({"arrays": to_arrays(update), "metrics": metrics}),
                                                reply_to=message)

    loop = FlowerRoundLoop(cfg, ScriptedGrid(answer), timeout=3)
    update.update({key: torch.ones_like(tensor) for key, tensor in loop.global_state.tensors().items()})
    loop.node_of = {client: 10 + client for client in range(6)}
    results, ranks, _ = loop.train_clients(1, [0, 1, 2, 3])
    assert [result.client for result in results] == [0, 3] and ranks == {"0": 10, "3": 13}
    assert results[0].update.weight == 7 and torch.equal(results[0].update.lora["blocks.0.attn.proj"][0],
                                                         torch.ones(4, 32))
    sent = {message.metadata.dst_node_id: message for message in loop.grid.sent}
    assert sorted(sent) == [10, 11, 12, 13] and int(sent[10].content["config"]["server-round"]) == 1
    assert loop.failed == {"1": "node lost", "2": "no reply within 3 s"}
    assert loop.merges_applied == {0: 0, 3: 0}


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_the_simulations_ray_listens_on_the_loopback_interface_only(tmp_path, monkeypatch):
    """Read while a round runs: every socket that Ray's processes (this process's descendants) listen on."""
    monkeypatch.delenv(LOCAL_RAY, raising=False)
    listening: list[tuple[str, str]] = []
    train_clients = FlowerRoundLoop.train_clients

    def reading_sockets(loop, round_index, sampled, steps=None):
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                listening.extend((process.name(), c.laddr.ip) for c in process.net_connections(kind="inet")
                                 if c.status == psutil.CONN_LISTEN)
        return train_clients(loop, round_index, sampled, steps)

    monkeypatch.setattr(FlowerRoundLoop, "train_clients", reading_sockets)
    args = tiny_args(tmp_path, "--federation.rounds", "1", "--federation.clients_per_round", "2")
    assert main(["flower", *args]) == 0
    names = {name for name, _ in listening}
    assert "gcs_server" in names and "raylet" in names, listening  # Ray's own servers were seen
    assert {ip for _, ip in listening} <= LOOPBACK, listening


MALFORMED = {
    "empty ArrayRecord": (lambda update, metrics: ({}, metrics), "its ArrayRecord is empty"),
    "missing key": (lambda update, metrics: (dict(list(update.items())[1:]), metrics), "is missing"),
    "fp16": (lambda update, metrics: ({k: t.half() for k, t in update.items()}, metrics), "is float16"),
    "higher rank": (lambda update, metrics: ({k: torch.ones(8, t.shape[1]) if k.endswith("/A") else
                                              torch.ones(t.shape[0], 8) if k.startswith("lora/") else t
                                              for k, t in update.items()}, metrics), "has shape (8, 32)"),
    "count above the client's size": (lambda update, metrics: (update, {**metrics, "num-examples": 10**6}),
                                      "example count 1000000 is above max_examples"),
    "no train loss": (lambda update, metrics: (update, {k: v for k, v in metrics.items() if k != "train-loss"}),
                      "unreadable: 'train-loss'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_reply_is_dropped_with_its_node_in_the_round_record(tmp_path, monkeypatch, capsys, case):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = tiny_config(tmp_path, "--server.method", "fedit")
    update, metrics = {}, {"num-examples": 7, "train-loss": 0.5, "steps": 3, "skipped-images": 0}
    change, problem = MALFORMED[case]

    def answer(message):
        arrays, numbers = change(update, metrics) if message.metadata.dst_node_id == 12 else (update, metrics)
        return Message(RecordDict({"arrays": to_arrays(arrays), "metrics": MetricRecord(numbers)}), reply_to=message)

    loop = FlowerRoundLoop(cfg, ScriptedGrid(answer), timeout=3)
    update.update({key: torch.ones_like(t) for key, t in loop.global_state.tensors().items() if "lora_r" not in key})
    loop.node_of = {client: 10 + client for client in range(6)}
    results, _, _ = loop.train_clients(1, [0, 2, 3])
    assert [result.client for result in results] == [0, 3] and loop.failed == {}
    assert list(loop.malformed) == ["2"] and loop.malformed["2"].startswith("malformed reply from node 12: ")
    assert problem in loop.malformed["2"]
    record = loop.aggregate(1, results, [0, 2, 3]).record
    assert record.bad_updates == loop.malformed and not record.skipped
    assert ("warning: round 1: dropping 1 bad update(s), the others are re-weighted: client 2: malformed reply from "
            "node 12") in capsys.readouterr().out
