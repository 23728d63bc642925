"""Methods that change what clients train and keep: the client rule, FedSA-LoRA and RoLoRA.

Expectations are computed another way than the code: weighted means by plain loops, the ideal update as dense
products by hand, what each client must start from by replaying the rounds from the clients' own updates, scores by
a plain evaluation loop. The looks inside a run are the model's own LoRA parameters at each client's first step
(`Spy`), so a start that `load` or a shared object got wrong shows up, not only a wrong argument."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorafair.aggregation import ClientRule, ClientUpdate, build_aggregator
from lorafair.aggregation.fedsa_lora import FedSALoRA
from lorafair.cli import main
from lorafair.config import ConfigError
from lorafair.federated.checkpoints import load_checkpoint
from lorafair.fit import fit
from lorafair.keys import unpack_clients
from tests.helpers import items_right_by_hand, parse_fit_args, spied_run, tiny_args, tiny_config

SHAPES = {"blocks.0.attn.proj": (6, 5), "blocks.0.mlp.fc2": (6, 9), "blocks.1.attn.proj": (6, 5)}
"""name -> (out, in); two layers of one shape run as one batch."""
RANK = 2
WEIGHTS = (3.0, 1.0, 6.0)


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def server_state(generator: torch.Generator, zero_B: bool = False) -> ClientUpdate:
    """The server's pairs and head, as the round's template."""
    lora = {name: (randn(generator, RANK, fan_in), torch.zeros(fan_out, RANK, dtype=torch.float64) if zero_B
                   else randn(generator, fan_out, RANK)) for name, (fan_out, fan_in) in SHAPES.items()}
    return ClientUpdate(1.0, lora, {"head.weight": randn(generator, 3, 4)})


def trained_from(server: ClientUpdate, generator: torch.Generator, factors: str) -> list[ClientUpdate]:
    """One update per weight: the server's pairs with the given factors trained (random), the others returned as
    they were given."""
    return [ClientUpdate(weight, {name: tuple(randn(generator, *factor.shape) if letter in factors else factor.clone()
                                              for letter, factor in zip("AB", pair, strict=True))
                                  for name, pair in server.lora.items()},
                         {"head.weight": randn(generator, 3, 4)})
            for weight in WEIGHTS]


def weighted_mean(tensors: list[torch.Tensor], weights=WEIGHTS) -> torch.Tensor:
    total = sum(weights)
    mean = torch.zeros_like(tensors[0])
    for weight, tensor in zip(weights, tensors, strict=True):
        mean += (weight / total) * tensor
    return mean


# ---- the client rule --------------------------------------------------------------------------------------------


def test_a_client_rule_refuses_factors_that_would_be_lost_or_both_kept_and_averaged():
    with pytest.raises(ValueError, match="clients upload A but train only 'B'"):
        ClientRule(trains="B", sends="A")
    with pytest.raises(ValueError, match="a factor is either averaged or a client's own"):
        ClientRule(trains="AB", sends="AB", keeps="B")
    with pytest.raises(ValueError, match="a trained factor would be lost"):
        ClientRule(trains="AB", sends="A")
    with pytest.raises(ValueError, match="must be one of"):
        ClientRule(trains="C")
    assert ClientRule(trains="B", sends="B").frozen == "A" and not ClientRule(trains="B", sends="B").personal
    fedsa = build_aggregator("fedsa_lora").client_rule(7)
    assert (fedsa.trains, fedsa.sends, fedsa.keeps, fedsa.frozen, fedsa.personal) == ("AB", "A", "B", "", True)
    assert [build_aggregator("rolora").client_rule(t).trains for t in (1, 2, 3, 4)] == ["B", "A", "B", "A"]
    assert build_aggregator("ffa_lora").client_rule(5) == ClientRule(trains="B", sends="B")
    assert build_aggregator("fedit").client_rule(5) == ClientRule()


# ---- RoLoRA in the library --------------------------------------------------------------------------------------


@pytest.mark.parametrize("round_index", [1, 2, 3, 4])
def test_rolora_averages_the_factor_of_the_round_and_the_pair_is_the_exact_mean_of_the_clients_products(round_index):
    """Fails if the parity is swapped, the mean is unweighted, the frozen factor is averaged or taken from a client
    other than the server, or the answer is not the ideal update."""
    generator = torch.Generator().manual_seed(round_index)
    server = server_state(generator)
    trained = "B" if round_index % 2 else "A"
    updates = trained_from(server, generator, trained)
    out = build_aggregator("rolora").aggregate(updates, like=server, round_index=round_index)
    position = "AB".index(trained)
    for name, (A, B) in server.lora.items():
        ideal = sum((weight / sum(WEIGHTS)) * (u.lora[name][1] @ u.lora[name][0])  # dense, client by client
                    for weight, u in zip(WEIGHTS, updates, strict=True))
        new_A, new_B = out.lora[name]
        torch.testing.assert_close(new_B @ new_A, ideal, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.lora[name][position], weighted_mean([u.lora[name][position] for u in updates]),
                                   rtol=0, atol=1e-12)
        assert torch.equal(out.lora[name][1 - position], (A, B)[1 - position])  # the server's, bit for bit
    torch.testing.assert_close(out.extra["head.weight"], weighted_mean([u.extra["head.weight"] for u in updates]))
    assert out.metrics["cos_avg_min"] == pytest.approx(1.0, abs=1e-12)
    sent = sum(RANK * (fan_in if trained == "A" else fan_out) for fan_out, fan_in in SHAPES.values())
    assert out.bytes_up == out.bytes_down == (sent + 3 * 4) * 8  # one factor and the head, each way


@pytest.mark.parametrize(("round_index", "changed"), [(1, "A"), (2, "B")])
def test_rolora_refuses_a_client_that_changed_the_frozen_factor(round_index, changed):
    generator = torch.Generator().manual_seed(0)
    server = server_state(generator)
    updates = trained_from(server, generator, "B" if round_index % 2 else "A")
    A, B = updates[2].lora["blocks.0.mlp.fc2"]
    updates[2].lora["blocks.0.mlp.fc2"] = (A + 1e-6, B) if changed == "A" else (A, B + 1e-6)
    with pytest.raises(ValueError, match=rf"^rolora: client 2 sent a different {changed} than client 0 for layer "
                                         r"'blocks\.0\.mlp\.fc2'; RoLoRA clients train only "
                                         rf"{'AB'.replace(changed, '')} this round"):
        build_aggregator("rolora").aggregate(updates, like=server, round_index=round_index)


# ---- FedSA-LoRA in the library ----------------------------------------------------------------------------------


def test_fedsa_lora_averages_A_and_never_touches_B():
    """The server's B comes back bit for bit (not a client's B, not their mean), A and the head are the weighted
    means, only A and the head travel, and no B enters the sums that cross the ranks."""
    generator = torch.Generator().manual_seed(1)
    server = server_state(generator, zero_B=True)
    updates = trained_from(server, generator, "AB")
    out = build_aggregator("fedsa_lora").aggregate(updates, like=server)
    for name, (_, B) in server.lora.items():
        torch.testing.assert_close(out.lora[name][0], weighted_mean([u.lora[name][0] for u in updates]),
                                   rtol=0, atol=1e-12)
        assert torch.equal(out.lora[name][1], B)
    torch.testing.assert_close(out.extra["head.weight"], weighted_mean([u.extra["head.weight"] for u in updates]))
    A_bytes = sum(RANK * fan_in for _, fan_in in SHAPES.values()) * 8
    assert out.bytes_up == out.bytes_down == A_bytes + 3 * 4 * 8
    # the server's B is not the clients': no cosine to an ideal update it cannot form
    assert not [key for key in out.metrics if key.startswith(("cos_avg", "cos_rank"))]
    assert "cos_avg_mean" in build_aggregator("fedit").aggregate(updates, like=server).metrics

    state = build_aggregator("fedsa_lora").start(server, clients=len(updates))
    # the weight sum, the count, the count per lower rank (RANK of them), the A sums and the head sum
    assert sum(t.numel() for t in state.accumulators()) == 2 + RANK + A_bytes // 8 + 3 * 4


@pytest.mark.parametrize("method", ["fedsa_lora", "rolora"])
def test_methods_that_average_one_factor_alone_refuse_clients_of_other_ranks(method, tmp_path):
    generator = torch.Generator().manual_seed(2)
    server = server_state(generator)
    updates = trained_from(server, generator, "B")  # RoLoRA's round 1 freezes A
    updates[1].lora = {name: (A[:1], B[:, :1]) for name, (A, B) in updates[1].lora.items()}
    with pytest.raises(ValueError, match=rf"^{method}: client 1 has LoRA rank 1 in layer 'blocks\.0\.attn\.proj', "
                                         r"not the global 2; .* takes no clients of other ranks"):
        build_aggregator(method).aggregate(updates, like=server)
    with pytest.raises(ConfigError) as refused:
        parse_fit_args(tiny_args(tmp_path, "--server.method", method, "--lora.client_ranks", "[2, 4]"))
    assert str(refused.value) == (f"lora.client_ranks: {method} takes no clients of different ranks; leave "
                                  "lora.client_ranks unset (every client at lora.r = 4) or use another method")
    assert parse_fit_args(tiny_args(tmp_path, "--server.method", method, "--lora.client_ranks", "[4]"))
    # the bounds run no method: they take any ranks
    assert parse_fit_args(tiny_args(tmp_path, "--server.method", method, "--lora.client_ranks", "[2, 4]",
                                    "--federation.setting", "local"))


# ---- in `lorafair fit` ------------------------------------------------------------------------------------------


def lora_bytes(pairs: dict, factors: str) -> int:
    return sum(pair["AB".index(f)].numel() * 4 for pair in pairs.values() for f in factors)


def test_fedsa_lora_each_client_starts_from_the_global_A_and_its_own_B_and_is_scored_on_its_own_model(tmp_path):
    """Three rounds of 5 of 6 clients, replayed from the clients' own updates: every client starts from the
    server's A with the B it ended its last round with (B = 0 before it first trained), never another client's;
    the server's A is the weighted mean of the round's A; the global model holds the sample-weighted mean of every
    client's B; results.json, TensorBoard and the checkpoint hold each client's own model's scores and B."""
    cfg = tiny_config(tmp_path, "--server.method", "fedsa_lora", "--federation.rounds", "3")
    trainer, spy, results = spied_run(cfg)
    initial = {name: a for name, (a, _) in trainer.initial_state.lora.items()}
    zero = {name: torch.zeros_like(b) for name, (_, b) in trainer.initial_state.lora.items()}

    own_B: dict[int, dict] = {}
    global_A, never_trained_started, came_back = initial, 0, 0
    for round_index, record in enumerate(results["rounds"], start=1):
        assert sorted((r, c) for r, c in spy.start if r == round_index) == [(round_index, c)
                                                                             for c in sorted(record["clients"])]
        for client in record["clients"]:
            start = spy.start[round_index, client]
            expected_B = own_B.get(client, zero)
            never_trained_started += client not in own_B and round_index > 1
            came_back += round_index > 1 and client in own_B and client not in results["rounds"][round_index - 2][
                "clients"]
            for name, (A, B) in start.items():
                assert torch.equal(A, global_A[name]), (round_index, client, name)
                assert torch.equal(B, expected_B[name]), (round_index, client, name)  # its own, bit for bit
        updates = [(spy.weights[c], spy.end[round_index, c]) for c in record["clients"]]
        total = sum(weight for weight, _ in updates)
        answer = spy.answers[round_index]
        for name in initial:
            by_hand = sum(weight / total * lora[name][0].double() for weight, lora in updates)
            torch.testing.assert_close(answer[name][0].double(), by_hand, rtol=0, atol=1e-6)
        global_A = {name: pair[0] for name, pair in answer.items()}
        own_B.update({c: {n: pair[1] for n, pair in spy.end[round_index, c].items()} for c in record["clients"]})
        # the global model: the server's A and the sample-weighted mean over all 6 clients of the B each holds
        # (B = 0 for the client round 1 left out)
        clients = trainer.data.clients
        for name, (A, B) in spy.states[round_index].lora.items():
            mean_B = (sum(c.num_samples * own_B.get(c.id, zero)[name].double() for c in clients)
                      / sum(c.num_samples for c in clients))
            assert torch.equal(A, global_A[name])
            torch.testing.assert_close(B.double(), mean_B, rtol=0, atol=1e-7)
        assert record["bytes_up"] == record["bytes_down"] == lora_bytes(answer, "A") + (10 * 32 + 10) * 4
    assert never_trained_started and came_back  # both cases happened: the test is not vacuous
    first = results["rounds"][0]["clients"]
    assert not torch.equal(own_B[first[0]]["blocks.0.attn.proj"], own_B[first[1]]["blocks.0.attn.proj"])

    saved = load_checkpoint(tmp_path / "checkpoints" / "round_00003.ckpt")
    for name, pair in saved["lora"].items():  # the checkpoint (and so the export) holds that global model
        assert all(torch.equal(pair[f], spy.states[3].lora[name]["AB".index(f)]) for f in "AB")
    # the checkpoint keeps each trained client's B, and nothing else of it
    kept = unpack_clients(saved["client_states"])
    assert sorted(kept) == sorted(own_B)
    for client, tensors in kept.items():
        assert sorted(tensors) == sorted(f"lora/{name}/B" for name in initial)
        assert all(torch.equal(tensors[f"lora/{name}/B"], own_B[client][name]) for name in initial)

    # scores: the global model on every domain; each client's own model (global A, own B, global head) on its own
    extra = {name: t for name, t in saved["extra"].items()}
    global_pairs = {name: (pair["A"], pair["B"]) for name, pair in saved["lora"].items()}
    right = items_right_by_hand(trainer, global_pairs, extra)
    assert results["final"]["accuracy"] == {d: sum(r) / len(r) for d, r in right.items()}
    personal = {}
    for client in clients:
        pairs = {name: (global_A[name], own_B.get(client.id, zero)[name]) for name in initial}
        items = items_right_by_hand(trainer, pairs, extra)[client.domain]
        personal.setdefault(client.domain, []).append(sum(items) / len(items))
    expected = {domain: sum(values) / len(values) for domain, values in personal.items()}
    assert results["personalised"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert results["personalised"]["round"] == 3
    assert results["personalised"]["mean_accuracy"] == pytest.approx(sum(expected.values()) / len(expected))
    assert results["personalised"]["mean_gain"] == pytest.approx(results["personalised"]["mean_accuracy"]
                                                                 - results["start"]["mean_accuracy"])
    assert results["rounds"][-1]["personalised"]["accuracy"] == results["personalised"]["accuracy"]
    assert json.loads((tmp_path / "results.json").read_text())["personalised"] == json.loads(
        json.dumps(results["personalised"]))

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    (last,) = [e for e in events.Scalars("personalised/accuracy/mean") if e.step == 3]
    assert last.value == pytest.approx(results["personalised"]["mean_accuracy"], rel=1e-6)
    assert events.Scalars("hparams/personalised_mean_accuracy")[-1].value == pytest.approx(
        results["personalised"]["mean_accuracy"], rel=1e-6)


def test_a_dropped_fedsa_lora_update_leaves_its_client_holding_what_it_held(tmp_path, monkeypatch):
    """Client 2's round-1 update is NaN and dropped: it keeps no B from that round (and starts round 2 from B = 0),
    while the others start round 2 from their own."""
    monkeypatch.setenv("LORAFAIR_POISON", "1:2")
    cfg = tiny_config(tmp_path, "--server.method", "fedsa_lora", "--federation.clients_per_round", "null")
    _, spy, results = spied_run(cfg)
    assert list(results["rounds"][0]["bad_updates"]) == ["2"]
    for client in range(6):
        for name, (_, B) in spy.start[2, client].items():
            if client == 2:
                assert not B.any()
            else:
                assert torch.equal(B, spy.end[1, client][name][1])


def test_rolora_trains_and_uploads_one_factor_a_round_from_the_servers_pair_and_aggregates_exactly(tmp_path):
    """Round 1 trains B with the server's A, round 2 A with the server's B; every client starts from the server's
    pair, never another client's; the global pair's product is the clients' mean product, by dense products by hand;
    a round uploads one factor, so two rounds send one FedIT round's factors (and two heads)."""
    cfg = tiny_config(tmp_path, "--server.method", "rolora")
    trainer, spy, results = spied_run(cfg)
    server = {name: pair for name, pair in trainer.initial_state.lora.items()}
    head = (10 * 32 + 10) * 4
    for round_index, record in enumerate(results["rounds"], start=1):
        trained = "B" if round_index % 2 else "A"
        position, frozen = "AB".index(trained), 1 - "AB".index(trained)
        updates = []
        for client in record["clients"]:
            for name, pair in spy.start[round_index, client].items():  # the server's pair, bit for bit
                assert all(torch.equal(pair[f], server[name][f]) for f in (0, 1)), (round_index, client, name)
            end = spy.end[round_index, client]
            for name, pair in end.items():
                assert torch.equal(pair[frozen], server[name][frozen])  # the frozen factor never moved
                assert not torch.equal(pair[position], server[name][position])  # the trained one did
            updates.append((spy.weights[client], end))
        total = sum(weight for weight, _ in updates)
        answer = spy.answers[round_index]
        for name in server:
            ideal = sum(weight / total * (lora[name][1].double() @ lora[name][0].double()) for weight, lora in updates)
            new_A, new_B = answer[name]
            torch.testing.assert_close(new_B.double() @ new_A.double(), ideal, rtol=0, atol=1e-7)
            assert torch.equal(answer[name][frozen], server[name][frozen])
        assert record["bytes_up"] == record["bytes_down"] == lora_bytes(answer, trained) + head
        server = answer

    fedit = fit(tiny_config(tmp_path / "fedit", "--server.method", "fedit", "--federation.rounds", "1"))
    assert sum(r["bytes_up"] for r in results["rounds"]) == fedit["rounds"][0]["bytes_up"] + head
    assert "personalised" not in results and "personalised" not in results["rounds"][-1]


def test_rolora_moves_the_lora_product_in_round_1_from_the_standard_start(tmp_path):
    """From A random and B = 0, A alone gets no gradient: a first round that trained A would leave the product
    B A = 0 and log cos_avg 0. Round 1 trains B, so the checkpoint's global pair has a nonzero product (the factors
    as saved, multiplied here), and averaging the trained factor alone is exact (cos_avg 1)."""
    results = fit(tiny_config(tmp_path, "--server.method", "rolora", "--federation.rounds", "1"))
    saved = load_checkpoint(tmp_path / "checkpoints" / "round_00001.ckpt")
    for name, pair in saved["lora"].items():
        assert (pair["B"].double() @ pair["A"].double()).norm() > 1e-6, name
    assert results["rounds"][0]["aggregation"]["cos_avg_mean"] == pytest.approx(1.0, abs=1e-5)


def test_feddpa_clients_keep_their_own_local_adapter_upload_only_the_global_pair_and_are_scored_mixed(tmp_path):
    """Three rounds of 5 of 6 clients, replayed: every client's local adapter at its first step is the one it ended
    its last round with (before that: the run's initial A with B = 0), never another client's; the global pair at
    its first step is the server's; the server's pair is the weighted mean of the round's global pairs, the global
    model that pair alone; bytes up are the global pair and the head; the checkpoint keeps each trained client's
    local adapter and feature summary; the personalised scores are present (the mix itself: tests/aggregation)."""
    cfg = tiny_config(tmp_path, "--server.method", "feddpa", "--federation.rounds", "3", "--client.lr", "0.5")
    trainer, spy, results = spied_run(cfg)
    initial = trainer.initial_state.lora

    own_local: dict[int, dict] = {}
    global_pairs = {name: (a, b) for name, (a, b) in initial.items()}
    sat_out_and_came_back = 0
    for round_index, record in enumerate(results["rounds"], start=1):
        for client in record["clients"]:
            expected = own_local.get(client, {n: (a, torch.zeros_like(b)) for n, (a, b) in initial.items()})
            local = spy.local[round_index, client]
            sat_out_and_came_back += round_index > 2 and client in own_local and client not in results["rounds"][
                round_index - 2]["clients"]
            for name in initial:
                assert all(torch.equal(local[name][i], expected[name][i]) for i in (0, 1)), (round_index, client)
                assert all(torch.equal(spy.start[round_index, client][name][i], global_pairs[name][i])
                           for i in (0, 1))
        updates = [(spy.weights[c], spy.end[round_index, c]) for c in record["clients"]]
        total = sum(weight for weight, _ in updates)
        answer = spy.answers[round_index]
        for name in initial:
            for i in (0, 1):
                by_hand = sum(weight / total * lora[name][i].double() for weight, lora in updates)
                torch.testing.assert_close(answer[name][i].double(), by_hand, rtol=0, atol=1e-6)
        global_pairs = answer
        assert all(torch.equal(spy.states[round_index].lora[n][i], answer[n][i]) for n in answer for i in (0, 1))
        assert not spy.states[round_index].local
        own_local.update({c: spy.local_end[round_index, c] for c in record["clients"]})
        assert record["bytes_up"] == record["bytes_down"] == lora_bytes(answer, "AB") + (10 * 32 + 10) * 4
    assert sat_out_and_came_back
    first = results["rounds"][0]["clients"]
    assert not torch.equal(own_local[first[0]]["blocks.0.attn.proj"][1], own_local[first[1]]["blocks.0.attn.proj"][1])

    saved = load_checkpoint(tmp_path / "checkpoints" / "round_00003.ckpt")
    kept = unpack_clients(saved["client_states"])
    assert sorted(kept) == sorted(own_local)
    for client, tensors in kept.items():
        assert sorted(tensors) == sorted([f"local/{n}/{f}" for n in initial for f in "AB"] + ["local_features"])
        assert all(torch.equal(tensors[f"local/{n}/{f}"], own_local[client][n]["AB".index(f)])
                   for n in initial for f in "AB")
    assert results["personalised"]["round"] == 3 and set(results["personalised"]["accuracy"]) == set(
        results["final"]["accuracy"])


@pytest.mark.parametrize("method", ["fedsa_lora", "feddpa", "frlora", "fed_sb"])
def test_a_run_stopped_after_round_1_resumes_to_the_uninterrupted_result(tmp_path, method):
    """What a method keeps apart from the global pair travels through the checkpoint: each client's own B
    (FedSA-LoRA), each client's local adapter and feature summary (FedDPA), the frozen weights the merges changed
    (FRLoRA, over the start the resumed run takes again), the basis of the core (Fed-SB, cut again from the same
    gradient)."""
    whole = fit(tiny_config(tmp_path / "whole", "--server.method", method))
    fit(tiny_config(tmp_path / "resumed", "--server.method", method, "--federation.rounds", "1"))
    resumed = fit(tiny_config(tmp_path / "resumed", "--server.method", method, "--resume", "auto"))
    assert resumed["final"] == whole["final"] and resumed.get("personalised") == whole.get("personalised")
    assert [r["train_loss"] for r in resumed["rounds"]] == [r["train_loss"] for r in whole["rounds"]]
    ours, theirs = (load_checkpoint(tmp_path / run / "checkpoints" / "round_00002.ckpt")
                    for run in ("resumed", "whole"))
    for part in ("client_states", "base"):
        mine, reference = ours.get(part) or {}, theirs.get(part) or {}
        assert mine.keys() == reference.keys()
        assert all(torch.equal(mine[key], reference[key]) for key in mine)
    assert all(torch.equal(ours["lora"][name][f], theirs["lora"][name][f]) for name in ours["lora"] for f in "AB")


def test_a_feddpa_clients_own_model_is_not_exported(tmp_path, capsys):
    """A FedDPA client's own model mixes its local adapter in per input, which no peft adapter holds: its export is
    refused with one line."""
    fit(tiny_config(tmp_path / "run", "--server.method", "feddpa", "--federation.rounds", "1"))
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "run"), "--client", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mixes a local adapter of its own" in err and len(err.splitlines()) == 1, err


def test_iid_clients_are_refused_where_clients_keep_factors_and_score_their_own_models(tmp_path, capsys,
                                                                                       monkeypatch):
    """The personalised evaluation scores each client's own model on its own domain, which no iid client has: the
    config is refused before anything runs, by the method's client rule, not by its name."""
    iid = ["--federation.partition", "iid", "--federation.rounds", "1"]
    assert main(["fit", *tiny_args(tmp_path / "fedsa", "--server.method", "fedsa_lora", *iid)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("federation.partition: iid gives no client a domain of its own, yet fedsa_lora's "
                              "clients keep factors of their own") in err[0] and "use partition feature" in err[0]
    assert not (tmp_path / "fedsa").exists()
    with pytest.raises(ConfigError, match=r"^federation\.partition: iid gives no client a domain of its own, yet "
                                          r"feddpa's clients keep"):
        parse_fit_args(tiny_args(tmp_path, "--server.method", "feddpa", *iid))  # its local adapter
    parse_fit_args(tiny_args(tmp_path, "--server.method", "rolora", *iid))  # another factor each round, none kept
    parse_fit_args(tiny_args(tmp_path, "--server.method", "fedsa_lora", *iid, "--federation.setting", "centralized"))

    def keeps_b_from_round(first):
        return lambda self, round_index: ClientRule("AB", "A", "B") if round_index >= first else ClientRule()

    # round r's evaluation scores by round r + 1's rule: a rule keeping B from round 2 on is refused in a 1-round
    # run, one keeping it from round 3 on is not (no evaluation of a 1-round run sees it)
    monkeypatch.setattr(FedSALoRA, "client_rule", keeps_b_from_round(2))
    with pytest.raises(ConfigError, match=r"^federation\.partition: iid"):
        parse_fit_args(tiny_args(tmp_path, "--server.method", "fedsa_lora", *iid))
    monkeypatch.setattr(FedSALoRA, "client_rule", keeps_b_from_round(3))
    parse_fit_args(tiny_args(tmp_path, "--server.method", "fedsa_lora", *iid))
    with pytest.raises(ConfigError, match=r"^federation\.partition: iid"):
        parse_fit_args(tiny_args(tmp_path, "--server.method", "fedsa_lora", *iid, "--federation.rounds", "2"))
