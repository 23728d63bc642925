"""`lorafair flower`'s apps with methods whose clients train another factor each round (RoLoRA) or keep their own B
(FedSA-LoRA), against `lorafair fit` with the same config and seed. The ServerApp's round loop runs in this process
and sends to a grid that hands every message to the ClientApp with its node's own Context, as Flower's engines do
(without Ray, so it takes seconds).

Three clients, two per round (seed 0 samples clients 1, 2; 0, 2; 1, 2), three rounds; client 2's round-2 update is
NaN, so the server drops it: under FedSA-LoRA its node must go back to the B it held before, and client 0, which
sits out rounds 1 and 3, starts from the initial B and keeps its round-2 B.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from lorafair.cli import main
from lorafair.errors import UserError
from lorafair.federated.checkpoints import list_checkpoints, load_checkpoint
from lorafair.flower.app import make_client_app, run_server
from lorafair.flower.records import OWN, PENDING
from lorafair.keys import unpack_clients
from tests.helpers import tiny_args, tiny_config

JOB = ["--data.domains", "[plain,inverted,rotated]", "--federation.clients_per_round", "2",
       "--federation.rounds", "3", "--cpu_threads", "1"]
POISONED = "2:2"
"""Round 2, client 2."""


class InProcessGrid:
    """Nodes 10 + client id, each with its own Context; a message goes to the ClientApp, an exception comes back as
    an error reply. Keeps every (message, reply)."""

    def __init__(self, app, clients):
        self.app = app
        self.contexts = {10 + client: Context(1, 10 + client, {"partition-id": client}, RecordDict(), {})
                         for client in range(clients)}
        self.exchanges = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout):
        for message in messages:
            try:
                reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as err:  # Flower turns any exception of a ClientApp into an error reply
                reply = Message(Error(code=0, reason=str(err)), reply_to=message)
            self.exchanges.append((message, reply))
        return [reply for _, reply in self.exchanges[-len(messages):]]

    def of_type(self, message_type):
        return [(message, reply) for message, reply in self.exchanges if message.metadata.message_type == message_type]


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def run_both(tmp_path, monkeypatch, method):
    """results.json of `fit` and of the Flower apps (with their grid), the same job, client 2's round-2 update NaN."""
    monkeypatch.setenv("LORAFAIR_POISON", POISONED)
    args = [*JOB, "--server.method", method]
    assert main(["fit", *tiny_args(tmp_path / "fit", *args)]) == 0
    cfg = tiny_config(tmp_path / "flower", *args)
    grid = InProcessGrid(make_client_app(lambda _: cfg), 3)
    flower = run_server(cfg, grid, timeout=60)
    fit = json.loads((tmp_path / "fit" / "results.json").read_text())
    assert [r["clients"] for r in flower["rounds"]] == [r["clients"] for r in fit["rounds"]] == [[1, 2], [0, 2],
                                                                                                  [1, 2]]
    for ours, reference in zip(flower["rounds"], fit["rounds"], strict=True):
        assert ours["bad_updates"].keys() == reference["bad_updates"].keys() == ({"2"} if ours["round"] == 2 else set())
        assert ours["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
        assert ours["bytes_by_client"] == reference["bytes_by_client"]
    return fit, flower, grid


def factors_in(record):
    """The LoRA factors ("A", "B") an ArrayRecord of lorafair's keys ("lora/<layer>/<factor>") holds."""
    return {key.rsplit("/", 1)[1] for key in record if key.startswith("lora/")}


def test_rolora_nodes_train_the_factor_the_message_names_and_equal_fit(tmp_path, monkeypatch):
    fit, flower, grid = run_both(tmp_path, monkeypatch, "rolora")
    for ours, reference in zip(flower["rounds"], fit["rounds"], strict=True):
        assert ours["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-12)
    for message, reply in grid.of_type(MessageType.TRAIN):  # round 1 is odd: B, as in fit
        config = message.content["config"]
        factor = "B" if config["server-round"] % 2 else "A"
        assert (config["lorafair.trains"], config["lorafair.sends"]) == (factor, factor)
        assert factors_in(message.content["arrays"]) == {"A", "B"}  # a node that sat out gets the whole pair
        assert factors_in(reply.content["arrays"]) == {factor}  # only the trained factor travels up
    assert flower["final"]["mean_accuracy"] == pytest.approx(fit["final"]["mean_accuracy"], abs=1e-12)


def test_fedsa_lora_nodes_keep_their_own_b_which_never_travels_and_score_their_own_models_as_fit(tmp_path,
                                                                                                 monkeypatch, capsys):
    fit, flower, grid = run_both(tmp_path, monkeypatch, "fedsa_lora")
    for ours, reference in zip(flower["rounds"], fit["rounds"], strict=True):
        assert ours["personalised"]["accuracy"] == pytest.approx(reference["personalised"]["accuracy"], abs=1e-12)
        assert ours["personalised"]["correct_items" if ours["round"] == 3 else "accuracy"] == \
            reference["personalised"]["correct_items" if ours["round"] == 3 else "accuracy"]
        assert "accuracy" not in ours and ours["global_model"].startswith("not available under Flower")
    assert flower["personalised"]["mean_accuracy"] == pytest.approx(fit["personalised"]["mean_accuracy"], abs=1e-12)
    assert flower["final"]["global_model"].startswith("not available under Flower: each client keeps its own B")
    out = capsys.readouterr().out
    assert "fedsa_lora: global model: not available under Flower" in out and "no final/ written" in out
    assert not (tmp_path / "flower" / "final").exists()

    assert len(grid.of_type(MessageType.EVALUATE)) == 3 * 3  # every node scores its own model after every round
    for message, reply in grid.of_type(MessageType.TRAIN) + grid.of_type(MessageType.EVALUATE):
        assert factors_in(message.content["arrays"]) == {"A"}  # no B travels down ...
        assert factors_in(reply.content.array_records.get("arrays", {})) <= {"A"}  # ... nor up

    # what each node holds is what fit's last checkpoint holds of that client: its own B, the dropped update's not
    last = load_checkpoint(list_checkpoints(tmp_path / "fit" / "checkpoints")[-1])
    fit_states = unpack_clients(last["client_states"])
    held = {}
    for node, context in grid.contexts.items():
        assert PENDING not in context.state  # the last evaluation settled every node's state
        held[node - 10] = context.state[OWN].to_torch_state_dict()
        assert held[node - 10].keys() == fit_states[node - 10].keys() and all(key.endswith("/B") for key in held[0])
        for key, tensor in held[node - 10].items():
            torch.testing.assert_close(tensor, fit_states[node - 10][key], rtol=0, atol=0)
    key = next(iter(held[0]))
    assert not torch.equal(held[0][key], held[1][key]) and not torch.equal(held[1][key], held[2][key])


@pytest.mark.parametrize("method", ["fedsa_lora", "feddpa"])
def test_a_flower_run_whose_clients_keep_state_of_their_own_does_not_resume(tmp_path, method):
    """A new Flower run's nodes start with empty states: resuming would silently restart every client's own B
    (FedSA-LoRA) or local adapter (FedDPA)."""
    args = [*JOB, "--server.method", method]
    assert main(["fit", *tiny_args(tmp_path, *args, "--federation.rounds", "1")]) == 0
    cfg = tiny_config(tmp_path, *args)
    grid = InProcessGrid(make_client_app(lambda _: cfg), 3)
    with pytest.raises(UserError, match=f"{method} cannot resume under Flower: what each client keeps of its own "
                                        "lives in its node's state"):
        run_server(cfg, grid, timeout=60)
    assert grid.exchanges == []


def test_a_flower_run_whose_clients_keep_factors_has_no_model_to_export_evaluate_or_predict(tmp_path, capsys):
    """Its checkpoints hold the server's A with the initial B (the nodes' own B never reached the server): export,
    evaluate and predict refuse every round's checkpoint with one line, the round that was not evaluated too (it is
    the results.json entry of the whole run they read, not an evaluated round's), and write nothing."""
    run = tmp_path / "flower"
    cfg = tiny_config(run, *JOB, "--server.method", "fedsa_lora", "--federation.rounds", "2",
                      "--federation.eval_every", "2")
    run_server(cfg, InProcessGrid(make_client_app(lambda _: cfg), 3), timeout=60)
    assert sorted(list_checkpoints(run / "checkpoints"))[0].name == "round_00001.ckpt"
    assert "global_model" not in json.loads((run / "results.json").read_text())["rounds"][0]  # round 1: no scores
    capsys.readouterr()
    image = tmp_path / "image.png"
    Image.new("RGB", (16, 16)).save(image)
    for command in (["export", "--run", str(run)], ["export", "--run", str(run), "--round", "1"],
                    ["export", "--run", str(run), "--client", "0"], ["evaluate", "--run", str(run)],
                    ["predict", "--run", str(run), str(image)]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{run} has no model to load, its global model being not available under Flower: " \
                                  "each client keeps its own B, which never reaches the server" in err[0], command
        assert "run the same config with `lorafair fit`" in err[0]
    assert not any(path.name.startswith("final") for path in run.iterdir())
