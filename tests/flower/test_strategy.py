"""LoraStrategy on Flower's own records and messages: every method against its dense reference, the bad-update
policy, failed nodes, merges under partial participation, and Flower's differential-privacy wrappers."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.task_identity import TaskIdentity

from lorafair.aggregation import ClientUpdate, build_aggregator, method_class, registered_methods
from lorafair.aggregation.reference import dense_reference
from lorafair.flower import LoraStrategy, hold_pending, merges_to_apply, own_tensors, rule_of_config, state_to_arrays
from lorafair.flower.records import arrays_to_state
from lorafair.flower.strategy import strategy_refusal
from lorafair.keys import PEFT_A as LORA_A
from lorafair.keys import PEFT_B as LORA_B
from lorafair.seeds import fresh_lora, seeded_generator
from tests.helpers import product

SHAPES = {"blocks.0.attn.proj": (6, 5), "blocks.1.mlp.fc2": (6, 7)}


RANK = 2


SCALING = 0.5


FACTOR_KEY = {"A": LORA_A, "B": LORA_B}


class FakeGrid:
    """What a strategy asks of Flower's Grid when it samples: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages take their run and sender from the process's task identity, as in a running ServerApp."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def random_update(weight, generator, dtype=torch.float64, shared_A=None):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    lora = {name: (shared_A[name].clone() if shared_A else randn(RANK, fan_in), randn(fan_out, RANK))
            for name, (fan_out, fan_in) in SHAPES.items()}
    return ClientUpdate(weight=weight, lora=lora, extra={"head.weight": randn(3, 4)})


def reply(message, update, partition_id, **metrics):
    """A node's reply holding what the message's client rule has it upload: those factors and the head."""
    rule = rule_of_config(message.content["config"])
    arrays = state_to_arrays(update.lora, update.extra)
    for key in [key for key in arrays if key.endswith(tuple(FACTOR_KEY[f] for f in "AB" if f not in rule.sends))]:
        del arrays[key]
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": update.weight, "partition-id": partition_id, "train-loss": 1.0, **metrics})})
    return Message(content=content, reply_to=message)


def train_round(strategy, server_round, arrays, updates, nodes):
    """Configure a round on `nodes`, answer each message with updates[node] (shuffled arrival), aggregate."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(nodes)))
    replies = [reply(m, updates[m.metadata.dst_node_id], m.metadata.dst_node_id) for m in messages]
    random.Random(server_round).shuffle(replies)
    return strategy.aggregate_train(server_round, replies)


FLOWER_METHODS = [method for method in registered_methods() if strategy_refusal(method) is None]
"""The methods LoraStrategy runs: all but those it refuses (`strategy_refusal`)."""


@pytest.mark.parametrize("method", FLOWER_METHODS)
def test_every_method_equals_its_dense_reference_through_flower_records(method):
    generator = torch.Generator().manual_seed(0)
    shared_A = {name: torch.randn(RANK, fan_in, generator=generator, dtype=torch.float64)
                for name, (_, fan_in) in SHAPES.items()} if "A" in build_aggregator(method).client_rule(1).frozen \
        else None
    updates = {node: random_update(weight, generator, shared_A=shared_A)
               for node, weight in zip((11, 12, 13, 14), (1.0, 2.5, 0.5, 4.0), strict=True)}
    strategy = LoraStrategy(method, seed=3, min_available_nodes=4, min_train_nodes=4)
    start = state_to_arrays(updates[11].lora, updates[11].extra)
    arrays, metrics = train_round(strategy, 1, start, updates, list(updates))
    expected = dense_reference(method, [updates[node] for node in sorted(updates)])
    kept = build_aggregator(method).client_rule(1).keeps  # FedSA-LoRA's B: neither sent back nor held by the server
    assert not [key for key in arrays if key.endswith(tuple(FACTOR_KEY[f] for f in kept))]
    tensors = {**arrays.to_torch_state_dict(), **{key: tensor for key, tensor in start.to_torch_state_dict().items()
                                                  if key.endswith(tuple(FACTOR_KEY[f] for f in kept))}}
    lora, extra = arrays_to_state(ArrayRecord(torch_state_dict=tensors))
    total = sum(u.weight for u in updates.values())
    torch.testing.assert_close(extra["head.weight"], sum(u.weight / total * u.extra["head.weight"]
                                                         for u in updates.values()))
    for name in SHAPES:
        if expected.lora is None:  # FLoRA: clients restart from a fresh seeded LoRA, A random and B zero
            fresh = fresh_lora({n: updates[11].lora[n] for n in SHAPES}, seeded_generator("lora_reinit", 3, 1))
            torch.testing.assert_close(lora[name], fresh[name])
            assert not lora[name][1].any()
        elif method in ("flexlora", "fedsvd"):  # singular vectors have a sign: compare the product
            torch.testing.assert_close(product(lora[name]), product(expected.lora[name]))
        else:
            torch.testing.assert_close(lora[name], expected.lora[name])
        if expected.merge is not None:
            torch.testing.assert_close(product(strategy.merges[-1][name]), expected.merge[name])
    assert (expected.merge is not None) == bool(strategy.merges)
    assert metrics["train-loss"] == pytest.approx(1.0) and "partition-id" not in metrics
    assert metrics["bad-updates"] == 0
    assert ("aggregation-cos_avg_mean" in metrics) == (not kept)  # no ideal update where clients keep a factor
    assert list(arrays.keys()) == [key for key in start if not key.endswith(tuple(FACTOR_KEY[f] for f in kept))]


def test_fresh_lora_is_the_models_own_init():
    """The strategy's restart after a FLoRA merge equals the one LoraClassifier.init_lora draws from that seed."""
    from lorafair.models.image import LoraClassifier
    from tests.helpers import tiny_config

    cfg = tiny_config("unused")
    model = LoraClassifier(cfg.model, cfg.lora, 10, cfg.client)
    model.init_lora(torch.Generator().manual_seed(42))
    expected = model.get_lora()
    for name, (lora_a, lora_b) in fresh_lora(expected, torch.Generator().manual_seed(42)).items():
        torch.testing.assert_close(lora_a, expected[name][0], rtol=0, atol=0)
        assert not lora_b.any()


@pytest.mark.parametrize("policy", ["drop", "error"])
def test_bad_update_is_dropped_and_the_rest_reweighted_or_stops_the_run(policy):
    generator = torch.Generator().manual_seed(1)
    updates = {node: random_update(weight, generator) for node, weight in ((1, 1.0), (2, 3.0), (3, 2.0))}
    updates[2].lora["blocks.1.mlp.fc2"][1][0, 0] = float("nan")
    start = state_to_arrays(updates[1].lora, updates[1].extra)
    strategy = LoraStrategy("fedit", on_bad_update=policy, min_available_nodes=3, min_train_nodes=3)
    if policy == "error":
        with pytest.raises(ValueError, match=r"client 2: NaN or Inf in layer 'blocks.1.mlp.fc2' B"):
            train_round(strategy, 1, start, updates, [1, 2, 3])
        return
    arrays, metrics = train_round(strategy, 1, start, updates, [1, 2, 3])
    lora, _ = arrays_to_state(arrays)
    for name in SHAPES:  # FedIT over clients 1 and 3 only, with weights 1/3 and 2/3
        torch.testing.assert_close(lora[name][0], (updates[1].lora[name][0] + 2 * updates[3].lora[name][0]) / 3)
    assert strategy.round_records[1]["bad_updates"] == {"2": "NaN or Inf in layer 'blocks.1.mlp.fc2' B"}
    assert metrics["bad-updates"] == 1


def test_a_failed_node_is_left_out_and_recorded():
    generator = torch.Generator().manual_seed(2)
    updates = {node: random_update(1.0, generator) for node in (1, 2, 3)}
    strategy = LoraStrategy("fedit", min_available_nodes=3, min_train_nodes=3)
    messages = list(strategy.configure_train(1, state_to_arrays(updates[1].lora, updates[1].extra), ConfigRecord(),
                                             FakeGrid([1, 2, 3])))
    replies = [Message(Error(code=0, reason="node lost"), reply_to=m) if m.metadata.dst_node_id == 3
               else reply(m, updates[m.metadata.dst_node_id], m.metadata.dst_node_id) for m in messages]
    arrays, metrics = strategy.aggregate_train(1, replies)
    lora, _ = arrays_to_state(arrays)
    layer = "blocks.0.attn.proj"
    torch.testing.assert_close(lora[layer][1], (updates[1].lora[layer][1] + updates[2].lora[layer][1]) / 2)
    assert strategy.round_records[1]["failed_nodes"] == {"3": "node lost"}
    assert metrics["failed-nodes"] == 1


class MergingClient:
    """A node that keeps its own frozen weights W and applies the merges the server sends, as a ClientApp must."""

    def __init__(self):
        generator = torch.Generator().manual_seed(100)  # every node starts from the same pretrained W0
        self.frozen = {name: torch.randn(*shape, generator=generator, dtype=torch.float64)
                       for name, shape in SHAPES.items()}
        self.applied = 0
        self.largest_catch_up = 0

    def receive(self, message, key="lorafair.merges"):
        pending = merges_to_apply(message.content.get(key), self.applied)
        for merge in pending:
            for name, pair in merge.items():
                self.frozen[name] += SCALING * product(pair)
        self.applied += len(pending)
        self.largest_catch_up = max(self.largest_catch_up, len(pending))


@pytest.mark.parametrize("method", ["flora", "fedex_lora"])
def test_partial_participation_every_client_catches_up_with_the_servers_frozen_weights(method):
    random.seed(0)  # Flower samples nodes with the random module
    nodes = {node: MergingClient() for node in range(1, 6)}
    server = MergingClient()
    generator = torch.Generator().manual_seed(5)
    strategy = LoraStrategy(method, fraction_train=0.4, min_train_nodes=2, min_available_nodes=5)
    arrays = state_to_arrays(random_update(1.0, generator).lora, {})
    grid = FakeGrid(nodes)
    for server_round in range(1, 7):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            nodes[node].receive(message)
            for name in SHAPES:  # a node trains on exactly the server's frozen weights
                torch.testing.assert_close(nodes[node].frozen[name], server.frozen[name], rtol=0, atol=0)
            if server_round == 3 and node == messages[0].metadata.dst_node_id:  # applied, then died
                replies.append(Message(Error(code=0, reason="lost"), reply_to=message))
                continue
            update = random_update(float(node), generator)
            replies.append(Message(content=RecordDict({"arrays": state_to_arrays(update.lora, {}), "metrics":
                                   MetricRecord({"num-examples": float(node)})}), reply_to=message))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        for name, pair in strategy.merges[-1].items():
            server.frozen[name] += SCALING * product(pair)
        server.applied += 1
    for message in strategy.configure_evaluate(7, arrays, ConfigRecord(), grid):  # everyone, including idle nodes
        nodes[message.metadata.dst_node_id].receive(message)
    for client in nodes.values():
        assert client.applied == 6
        for name in SHAPES:
            torch.testing.assert_close(client.frozen[name], server.frozen[name], rtol=0, atol=0)
    assert max(client.largest_catch_up for client in nodes.values()) > 1  # some node really sat out rounds


def test_merges_with_a_gap_are_refused():
    merges = [{"layer": (torch.ones(1, 2), torch.ones(2, 1))}] * 3
    from lorafair.flower.records import merges_to_arrays

    with pytest.raises(ValueError, match=r"merges \[2\] do not continue from the 1"):
        merges_to_apply(merges_to_arrays(merges, 2), 1)


def clipped(new, old, clipping_norm):
    """Flower's fixed clipping computed by hand: old + (new - old) * min(1, c / ||new - old|| over all arrays)."""
    norm = math.sqrt(sum(float(((new[k] - old[k]) ** 2).sum()) for k in new))
    return {k: old[k] + (new[k] - old[k]) * min(1.0, clipping_norm / norm) for k in new}


@pytest.mark.parametrize("side", ["client", "server"])
def test_differential_privacy_wrappers_clip_and_noise_a_lorafair_strategy(side):
    generator = torch.Generator().manual_seed(7)
    start = random_update(1.0, generator, dtype=torch.float32)
    updates = {node: random_update(2.0, generator, dtype=torch.float32) for node in (1, 2, 3)}
    old = state_to_arrays(start.lora, start.extra).to_torch_state_dict()
    expected = {}
    for update in updates.values():
        for key, value in clipped(state_to_arrays(update.lora, update.extra).to_torch_state_dict(), old, 0.5).items():
            expected[key] = expected.get(key, 0) + value / 3
    for noise_multiplier in (0.0, 4.0):
        wrapper = (DifferentialPrivacyClientSideFixedClipping if side == "client"
                   else DifferentialPrivacyServerSideFixedClipping)
        strategy = wrapper(LoraStrategy("fedit", min_available_nodes=3, min_train_nodes=3), noise_multiplier,
                           clipping_norm=0.5, num_sampled_clients=3)
        messages = strategy.configure_train(1, state_to_arrays(start.lora, start.extra), ConfigRecord(),
                                            FakeGrid(updates))
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            train = lambda m, _c, node=node: reply(m, updates[node], node)  # noqa: E731
            replies.append(fixedclipping_mod(message, Context(1, node, {}, RecordDict(), {}), train)
                           if side == "client" else train(message, None))
        arrays, _ = strategy.aggregate_train(1, replies)
        got = arrays.to_torch_state_dict()
        deviation = torch.cat([(got[k] - expected[k]).flatten() for k in expected])
        if noise_multiplier == 0:
            assert deviation.abs().max() < 1e-5
        else:  # Gaussian noise of std noise_multiplier * clipping_norm / num_sampled_clients on every entry
            assert deviation.std().item() == pytest.approx(4.0 * 0.5 / 3, rel=0.25)


def test_merging_methods_are_refused_under_client_side_differential_privacy():
    strategy = DifferentialPrivacyClientSideFixedClipping(LoraStrategy("flora"), 1.0, 0.5, 2)
    with pytest.raises(ValueError, match="flora merges into the frozen weights outside the arrays"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2]))


def test_lora_strategy_refuses_feddpa_and_names_lorafair_flower():
    """A LoraStrategy's nodes are the user's own ClientApp, which trains no local adapter: FedDPA stops with one line
    naming the Flower path that runs it (`lorafair flower`, whose ClientApp does)."""
    message = ("feddpa cannot run in LoraStrategy: its clients train a local adapter of their own before the shared "
               "pair and mix the two per input at evaluation, which only lorafair's own ClientApp does; run it with "
               "lorafair flower")
    with pytest.raises(ValueError) as refused:
        LoraStrategy("feddpa")
    assert str(refused.value) == message
    with pytest.raises(ValueError, match="run it with lorafair flower, or leave prune_gamma at 1"):
        LoraStrategy("hetlora", {"prune_gamma": 0.5})


def test_rolora_messages_name_the_rounds_factor_and_the_aggregate_is_the_exact_mean_product():
    """Rounds 1, 2, 3 tell every node to train B, A, B (round 1 is odd, as in `lorafair fit`); the nodes upload only
    that factor, and the aggregate's product is sum_k p_k B_k A_k computed densely, the other factor unchanged."""
    generator = torch.Generator().manual_seed(8)
    start = random_update(1.0, generator)
    weights = {1: 1.0, 2: 3.0, 3: 2.0}
    strategy = LoraStrategy("rolora", min_available_nodes=3, min_train_nodes=3)
    arrays = state_to_arrays(start.lora, start.extra)
    for server_round, factor in ((1, "B"), (2, "A"), (3, "B")):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(weights)))
        replies, updates = [], {}
        for message in messages:
            config, node = message.content["config"], message.metadata.dst_node_id
            rule = (config["lorafair.trains"], config["lorafair.sends"], config["lorafair.keeps"])
            assert rule == (factor, factor, "")
            given, _ = arrays_to_state(message.content["arrays"])
            moved = random_update(weights[node], generator)  # the trained factor moves, the other stays
            lora = {name: (moved.lora[name][0], pair[1]) if factor == "A" else (pair[0], moved.lora[name][1])
                    for name, pair in given.items()}
            updates[node] = ClientUpdate(weights[node], lora, moved.extra)
            replies.append(reply(message, updates[node], node))
            assert {key[len(key) - len(LORA_A):] for key in replies[-1].content["arrays"]
                    if key != "head.weight"} == {FACTOR_KEY[factor]}
        arrays, _ = strategy.aggregate_train(server_round, replies)
        lora, _ = arrays_to_state(arrays)
        total = sum(weights.values())
        frozen = "AB".index("B" if factor == "A" else "A")
        for name in SHAPES:
            mean_product = sum(weights[node] / total * product(updates[node].lora[name]) for node in weights)
            torch.testing.assert_close(product(lora[name]), mean_product)
            torch.testing.assert_close(lora[name][frozen], given[name][frozen], rtol=0, atol=0)
        assert strategy.round_records[server_round]["bad_updates"] == {}


def test_fedsa_lora_b_never_travels_each_node_keeps_its_own_and_personal_scores_aggregate():
    """Four rounds, 2 of 3 nodes each; nodes keep B in their node state with `own_tensors` / `hold_pending`. Node 2's
    round-2 update is NaN (dropped) and node 3 leaks its B in round 3 (dropped): each goes back to the B it held.
    No message carries a B either way; A is the weighted mean of the kept replies' A."""
    random.seed(1)  # Flower samples nodes with the random module
    generator = torch.Generator().manual_seed(9)
    start = random_update(1.0, generator)
    weights = {1: 1.0, 2: 3.0, 3: 2.0}
    b_keys = [f"{name}{LORA_B}" for name in SHAPES]
    initial_b = {key: tensor for key, tensor in state_to_arrays(start.lora, {}).to_torch_state_dict().items()
                 if key in b_keys}
    states = {node: RecordDict() for node in weights}
    expected = {node: initial_b for node in weights}  # each node's own B, tracked by hand
    last_kept = {node: 0 for node in weights}  # the last round whose update of the node was aggregated
    strategy = LoraStrategy("fedsa_lora", fraction_train=0.5, min_train_nodes=2, min_available_nodes=3)
    arrays, sat_out = state_to_arrays(start.lora, start.extra), set()
    for server_round in range(1, 5):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(weights)))
        replies, trained = [], {}
        for message in messages:
            node, config = message.metadata.dst_node_id, message.content["config"]
            assert not set(message.content["arrays"].keys()) & set(b_keys)  # B does not travel down
            own = own_tensors(states[node], config, initial_b)
            for key in b_keys:
                torch.testing.assert_close(own[key], expected[node][key], rtol=0, atol=0)
            moved = random_update(weights[node], generator)
            trained[node] = ClientUpdate(weights[node], {name: (moved.lora[name][0], own[f"{name}{LORA_B}"] +
                                                                moved.lora[name][1]) for name in SHAPES}, moved.extra)
            if (server_round, node) == (2, 2):
                trained[node].lora["blocks.0.attn.proj"][0][0, 0] = float("nan")
            hold_pending(states[node], server_round, {f"{name}{LORA_B}": pair[1]
                                                      for name, pair in trained[node].lora.items()})
            answer = reply(message, trained[node], node)
            if (server_round, node) == (3, 3):  # a node that sends its B anyway
                answer.content["arrays"][b_keys[0]] = message.content["arrays"][f"{next(iter(SHAPES))}{LORA_A}"]
            replies.append(answer)
            assert rule_of_config(config).keeps == "B" and config["lorafair.kept-round"] == last_kept[node]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        record = strategy.round_records[server_round]
        good = [node for node in trained if str(node) not in record["bad_updates"]]
        last_kept.update({node: server_round for node in good})
        sat_out |= set(weights) - set(trained)
        total = sum(weights[node] for node in good)
        aggregate = arrays.to_torch_state_dict()
        for name in SHAPES:
            torch.testing.assert_close(aggregate[f"{name}{LORA_A}"],
                                       sum(weights[n] / total * trained[n].lora[name][0] for n in good))
        assert not set(arrays.keys()) & set(b_keys)
        expected.update({node: {f"{name}{LORA_B}": trained[node].lora[name][1] for name in SHAPES} for node in good})
    assert "must not be sent" in strategy.round_records[3]["bad_updates"]["3"]
    assert "NaN" in strategy.round_records[2]["bad_updates"]["2"] and sat_out == set(weights)

    scores = {}
    evaluations = list(strategy.configure_evaluate(4, arrays, ConfigRecord(), FakeGrid(weights)))
    for message in evaluations:
        node = message.metadata.dst_node_id
        assert not set(message.content["arrays"].keys()) & set(b_keys)
        own = own_tensors(states[node], message.content["config"], initial_b)
        given = message.content["arrays"].to_torch_state_dict()
        scores[node] = sum(float(product((given[f"{name}{LORA_A}"], own[f"{name}{LORA_B}"])).sum()) for name in SHAPES)
        torch.testing.assert_close(own[b_keys[0]], expected[node][b_keys[0]], rtol=0, atol=0)
    metrics = strategy.aggregate_evaluate(4, [Message(RecordDict({"metrics": MetricRecord(
        {"num-examples": weights[m.metadata.dst_node_id], "score": scores[m.metadata.dst_node_id]})}), reply_to=m)
        for m in evaluations])
    assert metrics["score"] == pytest.approx(sum(weights[n] * scores[n] for n in scores) / sum(weights.values()))
    with pytest.raises(ValueError, match="fedsa_lora: each client keeps its own B, which never reaches the server"):
        strategy.start(FakeGrid(weights), arrays, evaluate_fn=lambda server_round, arrays: None)


@pytest.mark.parametrize("method", FLOWER_METHODS)
def test_secure_aggregation_takes_only_methods_that_need_sums(method):
    if method_class(method).sums_only:
        assert LoraStrategy(method, secure_aggregation=True).method == method
    else:
        with pytest.raises(ValueError, match=rf"^{method} needs each client's LoRA factors, which secure aggregation"):
            LoraStrategy(method, secure_aggregation=True)


def test_unknown_options_fail_at_construction():
    with pytest.raises(ValueError, match="lorafair: unknown option"):
        LoraStrategy("lorafair", {"lamda": 0.1})


def test_peft_keys_are_paired_and_a_lone_factor_is_named():
    record = ArrayRecord(torch_state_dict={f"l{LORA_A}": torch.ones(1, 2), f"l{LORA_B}": torch.ones(2, 1),
                                           f"m{LORA_B}": torch.ones(2, 1)})
    with pytest.raises(ValueError, match=f"array 'm{LORA_B}' has no 'm{LORA_A}'"):
        arrays_to_state(record)


def test_the_core_package_never_imports_flower():
    """Every module outside lorafair.flower (the CLI, the round loop, the roles, ...; not __main__, which runs the CLI)
    imports without flwr; importing lorafair.flower afterwards does, so the check sees a Flower import."""
    code = """
import importlib, json, pathlib, sys
import lorafair
root = pathlib.Path(lorafair.__file__).parent
names = [".".join(("lorafair", *p.relative_to(root).with_suffix("").parts)) for p in sorted(root.rglob("*.py"))]
skip = ("lorafair.flower", "lorafair.__main__")
core = [name.removesuffix(".__init__") for name in names if not name.startswith(skip)]
for name in core:
    importlib.import_module(name)
flower = lambda: sorted({m.split(".")[0] for m in sys.modules} & {"flwr", "ray"})
before = flower()
importlib.import_module("lorafair.flower.app")
print(json.dumps({"core": core, "before": before, "after": flower()}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"lorafair.cli", "lorafair.federated.loop", "lorafair.federated.server"} <= set(imported["core"])
    assert imported["before"] == []
    assert imported["after"] == ["flwr"]


def _malform(update: ClientUpdate, how: str) -> tuple[ClientUpdate | None, dict]:
    """An update (or None for an empty ArrayRecord) and reply metrics broken in the way `how` names."""
    layer = "blocks.0.attn.proj"
    lora, extra = dict(update.lora), dict(update.extra)
    a, b = lora[layer]
    if how == "higher rank":
        lora[layer] = (torch.randn(8, a.shape[1], dtype=a.dtype), torch.randn(b.shape[0], 8, dtype=b.dtype))
    elif how == "mixed ranks":
        lora[layer] = (a[:1].clone(), b[:, :1].clone())
    elif how == "wrong shape":
        lora[layer] = (torch.randn(RANK, 3, dtype=a.dtype), b)
    elif how in ("float16", "int64"):
        extra["head.weight"] = extra["head.weight"].to(getattr(torch, how))
    elif how == "missing key":
        del extra["head.weight"]
    elif how == "extra key":
        extra["head.bias"] = torch.zeros(3, dtype=a.dtype)
    elif how == "empty ArrayRecord":
        return None, {}
    counts = {"negative count": -5, "zero count": 0, "huge count": 10**15, "NaN count": float("nan")}
    return ClientUpdate(weight=update.weight, lora=lora, extra=extra), (
        {"num-examples": counts[how]} if how in counts else {})


@pytest.mark.parametrize("how", ["higher rank", "mixed ranks", "wrong shape", "float16", "int64", "missing key",
                                 "extra key", "empty ArrayRecord", "negative count", "zero count", "huge count",
                                 "NaN count"])
def test_a_malformed_reply_is_dropped_with_its_node_and_the_round_goes_on(how):
    """Nodes 1 and 3 reply well, node 2 badly: the answer is FedIT over nodes 1 and 3 at the initial shapes."""
    generator = torch.Generator().manual_seed(4)
    updates = {node: random_update(weight, generator) for node, weight in ((1, 1.0), (2, 3.0), (3, 2.0))}
    start = state_to_arrays(updates[1].lora, updates[1].extra)
    strategy = LoraStrategy("fedit", min_available_nodes=3, min_train_nodes=3, max_examples=10**6)
    messages = list(strategy.configure_train(1, start, ConfigRecord(), FakeGrid([1, 2, 3])))
    replies = []
    for message in messages:
        node = message.metadata.dst_node_id
        if node != 2:
            replies.append(reply(message, updates[node], node))
            continue
        broken, metrics = _malform(updates[2], how)
        if broken is None:
            content = RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(
                {"num-examples": 3.0, "partition-id": 2, "train-loss": 1.0})})
            replies.append(Message(content=content, reply_to=message))
        else:
            replies.append(reply(message, broken, 2, **metrics))
    arrays, metrics = strategy.aggregate_train(1, replies)
    record = strategy.round_records[1]
    assert list(record["bad_updates"]) == ["2"] and record["bad_updates"]["2"].startswith("malformed reply from node 2")
    assert record["clients"] == [1, 3] and metrics["bad-updates"] == 1
    lora, extra = arrays_to_state(arrays)
    assert {name: pair[0].shape for name, pair in lora.items()} == {name: (RANK, fan_in)
                                                                    for name, (_, fan_in) in SHAPES.items()}
    for name in SHAPES:
        torch.testing.assert_close(lora[name][1], (updates[1].lora[name][1] + 2 * updates[3].lora[name][1]) / 3)
    torch.testing.assert_close(extra["head.weight"],
                               (updates[1].extra["head.weight"] + 2 * updates[3].extra["head.weight"]) / 3)


def test_a_lower_rank_reply_is_taken_and_an_oversized_one_is_refused_before_it_is_read(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    updates = {node: random_update(1.0, generator) for node in (1, 2, 3)}
    start = state_to_arrays(updates[1].lora, updates[1].extra)
    layer = "blocks.1.mlp.fc2"
    updates[2].lora.update({name: (a[:1].clone(), b[:, :1].clone())  # a rank-1 client: allowed
                            for name, (a, b) in updates[2].lora.items()})
    a, b = updates[3].lora[layer]
    updates[3].lora[layer] = (torch.zeros(RANK, 200_000, dtype=a.dtype), b)  # 3 MB where 112 bytes are due
    read = []
    to_torch = ArrayRecord.to_torch_state_dict
    monkeypatch.setattr(ArrayRecord, "to_torch_state_dict", lambda self, *args, **kwargs: (
        read.append(sum(len(array.data) for array in self.values())), to_torch(self, *args, **kwargs))[1])
    strategy = LoraStrategy("fedit", min_available_nodes=3, min_train_nodes=3)
    arrays, _ = train_round(strategy, 1, start, updates, [1, 2, 3])
    assert strategy.round_records[1]["clients"] == [1, 2]
    assert "node 3: array 'blocks.1.mlp.fc2.lora_A.weight' has shape (2, 200000)" in \
        strategy.round_records[1]["bad_updates"]["3"]
    assert max(read) < 100_000  # the oversized reply was never turned into tensors
    assert arrays_to_state(arrays)[0][layer][0].shape == (RANK, 7)


@pytest.mark.parametrize("ratio", [10.0, None])
def test_a_reply_claiming_many_examples_is_clipped_to_ten_times_the_median_weight(ratio):
    """Node 3 claims 10**6 examples (below max_examples): it weighs 10 x the median (2) = 20, not 10**6 / 10**6+3."""
    generator = torch.Generator().manual_seed(5)
    updates = {node: random_update(weight, generator) for node, weight in ((1, 1.0), (2, 2.0), (3, 1e6))}
    strategy = LoraStrategy("fedit", min_available_nodes=3, min_train_nodes=3, max_weight_ratio=ratio)
    arrays, _ = train_round(strategy, 1, state_to_arrays(updates[1].lora, updates[1].extra), updates, [1, 2, 3])
    weights = {1: 1.0, 2: 2.0, 3: 20.0 if ratio else 1e6}
    total = sum(weights.values())
    torch.testing.assert_close(arrays_to_state(arrays)[1]["head.weight"],
                               sum(weights[n] / total * updates[n].extra["head.weight"] for n in updates))
    assert strategy.round_records[1].get("clipped_weights") == ({"3": [1e6, 20.0]} if ratio else None)
