"""`lorafair flower`'s apps with methods whose LoRA starts from an SVD made before round 1, against `lorafair fit`
with the same config and seed, in one process (`InProcessGrid`, without Ray): FRLoRA, whose start (the top-r SVD
taken out of each frozen weight) reaches the nodes as the run's first merge, and Fed-SB, whose start the server cuts
from the gradients the nodes send it, and whose nodes then train the core of A over the fixed rows A0 the messages
carry.

Three clients, two per round (seed 0 samples clients 1, 2; 0, 2; 1, 2), three rounds; client 2's round-2 update is
NaN, so the server drops it. Client 0 sits out round 1.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lorafair.cli import main
from lorafair.errors import UserError
from lorafair.federated import loop
from lorafair.federated.checkpoints import load_checkpoint, save_checkpoint
from lorafair.flower.app import (
    BASE,
    BASIS,
    GRADIENT,
    GRADIENT_QUERY,
    MERGES,
    gradient_shares,
    make_client_app,
    run_server,
    to_arrays,
)
from lorafair.keys import merge_indices, unpack_pairs
from tests.flower.test_app_client_rules import JOB, InProcessGrid, factors_in
from tests.flower.test_app_client_rules import run_both as run_fit_and_flower
from tests.helpers import tiny_args, tiny_config

RANK = 4
"""The tiny job's LoRA rank."""


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def run_both(tmp_path, monkeypatch, method):
    """The grid of the Flower apps' run of the job that `fit` also runs, client 2's round-2 update NaN, once their
    results.json are asserted equal (`test_app_client_rules.run_both`), here to the bit."""
    monkeypatch.setattr(loop, "save_checkpoint", partial(save_checkpoint, keep=3))  # fit keeps every round's
    fit, flower, grid = run_fit_and_flower(tmp_path, monkeypatch, method)
    for ours, reference in zip(flower["rounds"], fit["rounds"], strict=True):
        # the nodes train from the same start as fit's clients, with the same float32 operations in the same order
        # on one CPU thread: equal
        assert ours["train_loss"] == reference["train_loss"]
        assert ours["accuracy"] == reference["accuracy"]
    assert flower["start"]["accuracy"] == fit["start"]["accuracy"]
    assert flower["final"]["mean_accuracy"] == fit["final"]["mean_accuracy"]
    return grid


def test_frlora_nodes_take_the_start_as_the_first_merge_catch_up_and_equal_fit(tmp_path, monkeypatch):
    grid = run_both(tmp_path, monkeypatch, "frlora")
    trains = grid.of_type(MessageType.TRAIN)
    assert not any(BASE in message.content for message, _ in grid.exchanges)  # no dense frozen weights travel

    # round 1: each node gets the start alone, as merge 0 of rank r: (A0, -B0), A0 and B0 the pair it trains from
    first, _ = trains[0]
    merges = first.content[MERGES].to_torch_state_dict()
    assert merge_indices(merges) == [0]
    start = unpack_pairs(merges, "merge/0")
    pairs = unpack_pairs(first.content["arrays"].to_torch_state_dict(), "lora")
    for layer, (lora_a, lora_b) in start.items():
        assert lora_a.shape[0] == RANK == lora_b.shape[1] and lora_a.shape[1] != RANK != lora_b.shape[0]
        torch.testing.assert_close(lora_a, pairs[layer][0], rtol=0, atol=0)
        torch.testing.assert_close(lora_b, -pairs[layer][1], rtol=0, atol=0)
    # client 0 sat out round 1: in round 2 its message holds the start and round 1's merge (rank 2r), in order
    (to_client_0,) = [message for message, _ in trains if message.metadata.dst_node_id == 10]
    assert to_client_0.content["config"]["server-round"] == 2
    catch_up = to_client_0.content[MERGES].to_torch_state_dict()
    assert merge_indices(catch_up) == [0, 1]
    assert {lora_a.shape[0] for lora_a, _ in unpack_pairs(catch_up, "merge/1").values()} == {2 * RANK}
    for message, _ in trains:  # every round the nodes restart from (A0, B0), as the message carries it
        assert unpack_pairs(message.content["arrays"].to_torch_state_dict(), "lora").keys() == pairs.keys()
        for layer, pair in unpack_pairs(message.content["arrays"].to_torch_state_dict(), "lora").items():
            torch.testing.assert_close(pair, pairs[layer], rtol=0, atol=0)

    # client 0's node last caught up in round 2, with the start and round 1's merge, the other nodes in round 3, with
    # round 2's too: their frozen weights are exactly those of fit's checkpoints of rounds 1 and 2
    for node, context in grid.contexts.items():
        base = load_checkpoint(tmp_path / "fit" / "checkpoints" / f"round_0000{1 if node == 10 else 2}.ckpt")["base"]
        held = context.state[BASE].to_torch_state_dict()
        assert held.keys() == base.keys()
        for name, weight in held.items():
            torch.testing.assert_close(weight, base[name], rtol=0, atol=0)


def test_fed_sb_nodes_send_their_gradient_once_train_the_core_over_the_rows_sent_and_equal_fit(tmp_path,
                                                                                                 monkeypatch):
    grid = run_both(tmp_path, monkeypatch, "fed_sb")
    queries = [(message, reply) for message, reply in grid.exchanges
               if message.metadata.message_type == GRADIENT_QUERY]
    assert grid.exchanges[3:6] == queries  # after the partition queries, before round 1: one to every node
    assert sorted(message.metadata.dst_node_id for message, _ in queries) == [10, 11, 12]
    for _, reply in queries:  # a dense float64 gradient per adapted layer
        assert {share.dtype for share in reply.content[GRADIENT].to_torch_state_dict().values()} == {torch.float64}

    trains = grid.of_type(MessageType.TRAIN)
    assert len(trains) == 6
    basis = trains[0][0].content[BASIS].to_torch_state_dict()
    for message, reply in trains:
        torch.testing.assert_close(message.content[BASIS].to_torch_state_dict(), basis, rtol=0, atol=0)
        assert factors_in(reply.content["arrays"]) == {"A"}  # B0 stays where it is
        for layer, lora_a in unpack_pairs_a(reply.content["arrays"].to_torch_state_dict()).items():
            rows = basis[layer]
            torch.testing.assert_close(rows @ rows.T, torch.eye(RANK), atol=1e-5, rtol=0)  # orthonormal rows
            if not torch.isnan(lora_a).any():  # the poisoned reply aside: A = R A0 lies in the span of A0's rows
                torch.testing.assert_close(lora_a @ rows.T @ rows, lora_a, atol=1e-5, rtol=1e-4)


def unpack_pairs_a(tensors):
    """layer -> A of the `lora/<layer>/A` tensors of a reply."""
    return {key.split("/")[1]: tensor for key, tensor in tensors.items() if key.startswith("lora/")
            and key.endswith("/A")}


def test_fed_sb_stops_with_one_line_naming_a_node_that_fails_or_replies_malformed_at_the_gradient_step(tmp_path,
                                                                                                      monkeypatch):
    """The start is cut from every client's gradient: without one of them the run cannot start, and says so."""
    cfg = tiny_config(tmp_path, *JOB, "--server.method", "fed_sb")
    monkeypatch.setenv("LORAFAIR_CLIENT_ERROR", "0:1")
    grid = InProcessGrid(make_client_app(lambda _: cfg), 3)
    with pytest.raises(UserError) as failed:
        run_server(cfg, grid, timeout=60)
    assert str(failed.value) == ("fed_sb's start: client 1 (node 11) gave no gradient (LORAFAIR_CLIENT_ERROR: client "
                                 "1 fails in round 0); the start is cut from every client's gradient, so the run "
                                 "cannot start: fix or restart that node and run again")
    assert grid.of_type(MessageType.TRAIN) == []
    monkeypatch.delenv("LORAFAIR_CLIENT_ERROR")

    client_app = make_client_app(lambda _: cfg)

    def single_precision(message: Message, context: Context) -> Message:
        """Client 2's node replies with its gradient in float32."""
        reply = client_app(message, context)
        if message.metadata.message_type == GRADIENT_QUERY and context.node_id == 12:
            shares = {name: share.float() for name, share in reply.content[GRADIENT].to_torch_state_dict().items()}
            reply = Message(RecordDict({GRADIENT: to_arrays(shares), "metrics": reply.content["metrics"]}),
                            reply_to=message)
        return reply

    with pytest.raises(UserError, match=r"^fed_sb's start: client 2 \(node 12\) gave no gradient \(malformed reply: "
                                        r"array '.+' is float32, the global model's is float64\); the start is cut"):
        run_server(tiny_config(tmp_path / "malformed", *JOB, "--server.method", "fed_sb"),
                   InProcessGrid(single_precision, 3), timeout=60)


@pytest.mark.parametrize("method", ["frlora", "fed_sb"])
def test_a_resumed_flower_run_takes_the_start_again_and_ends_as_fit(tmp_path, method):
    """A new Flower run resumes round 2's checkpoint with fresh nodes: FRLoRA's nodes get the checkpoint's frozen
    weights once (no start merge: they hold it), Fed-SB's nodes send their gradient again (the basis is not
    checkpointed, as under fit), and round 3 is fit's."""
    args = [*JOB, "--server.method", method]
    assert main(["fit", *tiny_args(tmp_path / "fit", *args)]) == 0
    cfg = tiny_config(tmp_path / "flower", *args, "--federation.rounds", "2")
    run_server(cfg, InProcessGrid(make_client_app(lambda _: cfg), 3), timeout=60)
    cfg = tiny_config(tmp_path / "flower", *args)
    grid = InProcessGrid(make_client_app(lambda _: cfg), 3)
    flower = run_server(cfg, grid, timeout=60)
    fit = json.loads((tmp_path / "fit" / "results.json").read_text())
    assert [r["round"] for r in flower["rounds"]] == [1, 2, 3]
    for ours, reference in zip(flower["rounds"], fit["rounds"], strict=True):
        assert ours["train_loss"] == reference["train_loss"]
        assert ours["accuracy"] == reference["accuracy"]

    (message_1, _), (message_2, _) = grid.of_type(MessageType.TRAIN)  # round 3: clients 1 and 2
    if method == "frlora":
        base = load_checkpoint(tmp_path / "fit" / "checkpoints" / "round_00002.ckpt")["base"]
        for message in (message_1, message_2):
            assert merge_indices(message.content[MERGES].to_torch_state_dict()) == []
            for name, weight in message.content[BASE].to_torch_state_dict().items():
                torch.testing.assert_close(weight, base[name], rtol=0, atol=0)
    else:
        assert len([message for message, _ in grid.exchanges if message.metadata.message_type == GRADIENT_QUERY]) == 3


@pytest.mark.parametrize(("records", "problem"), [
    ({GRADIENT: {"layer": torch.ones(2, 3, dtype=torch.float64)}}, None),
    ({GRADIENT: {"layer": torch.ones(3, 2, dtype=torch.float64)}}, "malformed reply: array 'layer' has shape (3, 2)"),
    ({GRADIENT: {"other": torch.ones(2, 3, dtype=torch.float64)}}, "malformed reply: array 'layer' is missing"),
    ({"arrays": {"layer": torch.ones(2, 3, dtype=torch.float64)}},
     "malformed reply: its records are ['arrays', 'metrics'], not 'lorafair.gradient' and 'metrics'"),
    ({GRADIENT: {"layer": torch.full((2, 3), float("nan"), dtype=torch.float64)}},
     "malformed reply: the gradient of layer is not finite"),
], ids=["fit", "shape", "layer", "record", "nan"])
def test_a_gradient_reply_is_read_only_when_it_holds_one_finite_float64_gradient_per_layer(records, problem):
    query = Message(RecordDict(), message_type=GRADIENT_QUERY, dst_node_id=11)
    template = {"layer": ((2, 3), "float64")}
    content = RecordDict({name: to_arrays(tensors) for name, tensors in records.items()})
    content["metrics"] = MetricRecord({"num-examples": 7})
    shares, found = gradient_shares(Message(content, reply_to=query), template, 7, 60)
    assert found is None if problem is None else found.startswith(problem)
    assert (found is None) == (shares.keys() == {"layer"})
    if problem is None:  # the same reply from a node with another client's count
        content["metrics"] = MetricRecord({"num-examples": 6})
        assert gradient_shares(Message(content, reply_to=query), template, 7, 60) == (
            {}, "malformed reply: example count 6 is not the client's 7")
        assert gradient_shares(None, template, 7, 60) == ({}, "no reply within 60 s")
