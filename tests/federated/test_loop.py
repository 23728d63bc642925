"""End-to-end runs of the tiny job: outputs, resume, FLoRA's merges, FFA-LoRA's frozen A (faults: test_faults)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorafair.errors import UserError
from lorafair.federated.checkpoints import list_checkpoints, load_checkpoint
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.fit import fit
from tests.helpers import ROOT, parse_fit_args, tiny_config

DOMAINS = ["plain", "inverted", "rotated", "blurred", "noisy", "coloured"]


def test_a_run_writes_every_output(tiny_run):
    out_dir, results = tiny_run
    assert parse_fit_args(["--config", str(out_dir / "config.yaml")]) == tiny_config(out_dir)
    assert json.loads((out_dir / "classes.json").read_text()) == [str(d) for d in range(10)]

    assert (results["method"], results["seed"], results["domains"]) == ("lorafair", 0, DOMAINS)
    assert [record["round"] for record in results["rounds"]] == [1, 2]
    for record in results["rounds"]:
        assert len(record["clients"]) == 5 and sorted(record["train_loss"]) == sorted(map(str, record["clients"]))
        assert all(0 < loss < 10 for loss in record["train_loss"].values())
        assert set(record["train_steps"].values()) == {3}
        assert sorted(record["accuracy"]) == sorted(DOMAINS)
        assert all(0 <= acc <= 1 for acc in record["accuracy"].values())
        assert min(record["accuracy"].values()) <= record["mean_accuracy"] <= max(record["accuracy"].values())
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0 and record["bad_updates"] == {}
        assert -1 <= record["aggregation"]["cos_avg_mean"] <= 1
        seconds = record["seconds"]
        assert set(seconds) == {"train", "comm", "aggregate", "eval", "round"}
        assert all(value > 0 for value in seconds.values())
        assert seconds["round"] == pytest.approx(sum(seconds[p] for p in ("train", "comm", "aggregate", "eval")))
        # the overhead is the share of the round spent neither training nor evaluating
        assert 0 < record["overhead"] == pytest.approx(1 - (seconds["train"] + seconds["eval"]) / seconds["round"])
    assert results["rounds"][0]["clients"] != results["rounds"][1]["clients"]  # sampled anew each round
    last = results["rounds"][-1]
    start = results["start"]
    gain = {domain: pytest.approx(value - start["accuracy"][domain]) for domain, value in last["accuracy"].items()}
    assert results["final"] == {"round": 2, "accuracy": last["accuracy"], "mean_accuracy": last["mean_accuracy"],
                                "correct_items": last["correct_items"], "gain": gain,
                                "mean_gain": pytest.approx(last["mean_accuracy"] - start["mean_accuracy"])}
    assert "correct_items" not in results["rounds"][0]  # kept for the start and the last round only

    assert [path.name for path in list_checkpoints(out_dir / "checkpoints")] == ["round_00001.ckpt",
                                                                                 "round_00002.ckpt"]
    state = load_checkpoint(out_dir / "checkpoints" / "round_00002.ckpt")
    assert state["round"] == 2 and state["results"]["final"] == results["final"]
    assert state["base"] is None and set(state["extra"]) == {"head.weight", "head.bias"}

    events = EventAccumulator(str(out_dir / "tensorboard")).Reload()
    clients = sorted({client for record in results["rounds"] for client in record["clients"]})
    metrics = results["rounds"][0]["aggregation"]
    assert set(events.Tags()["scalars"]) == {
        *(f"accuracy/{d}" for d in DOMAINS), "accuracy/mean", *(f"train_loss/client_{c}" for c in clients),
        "train_loss/mean", "bytes/up_per_client", "bytes/down_per_client", "bad_updates", "bad_updates_total",
        *(f"seconds/{phase}" for phase in ("train", "comm", "aggregate", "eval", "round")),
        "seconds/overhead_fraction", *(f"aggregation/{name}" for name in metrics), "hparams/mean_accuracy"}
    for record in results["rounds"]:  # each round's scalars are its record's values, at its round
        losses = list(record["train_loss"].values())
        expected = {"accuracy/plain": record["accuracy"]["plain"], "accuracy/mean": record["mean_accuracy"],
                    "train_loss/mean": sum(losses) / len(losses), "bytes/up_per_client": record["bytes_up"],
                    "bytes/down_per_client": record["bytes_down"], "bad_updates": 0,
                    "seconds/train": record["seconds"]["train"], "seconds/overhead_fraction": record["overhead"],
                    "aggregation/cos_avg_mean": record["aggregation"]["cos_avg_mean"]}
        for tag, value in expected.items():
            (event,) = [e for e in events.Scalars(tag) if e.step == record["round"]]
            assert event.value == pytest.approx(value, rel=1e-6), tag
    assert events.Scalars("accuracy/mean")[-1].value == pytest.approx(results["final"]["mean_accuracy"])
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
    assert events.Scalars("hparams/mean_accuracy")[-1].value == pytest.approx(results["final"]["mean_accuracy"])


def test_stopping_after_one_round_and_resuming_gives_the_same_results(tiny_run, tmp_path):
    _, uninterrupted = tiny_run
    fit(tiny_config(tmp_path, "--federation.rounds", "1"))
    resumed = fit(tiny_config(tmp_path, "--resume", "auto"))
    assert resumed["final"] == uninterrupted["final"]
    assert [r["train_loss"] for r in resumed["rounds"]] == [r["train_loss"] for r in uninterrupted["rounds"]]

    with pytest.raises(UserError, match=r"server.method: 'lorafair' -> 'fedit'"):
        fit(tiny_config(tmp_path, "--resume", "auto", "--server.method", "fedit"))
    with pytest.raises(UserError, match=r"federation.rounds: 1 is fewer than the 2 rounds already done"):
        fit(tiny_config(tmp_path, "--resume", "auto", "--federation.rounds", "1"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match=r"foreign.ckpt is not a lorafair checkpoint \(it lacks base, extra"):
        fit(tiny_config(tmp_path, "--resume", str(foreign)))


def _spy_on_updates(trainer: FederatedTrainer) -> list[list]:
    """Record the ClientUpdates the server folds into each round (the usable ones), one list per round."""
    rounds, fold = [], trainer.server.fold

    def recording(round_index, results, *args):
        folded = fold(round_index, results, *args)
        rounds.append([(r.update.weight, {n: (a.clone(), b.clone()) for n, (a, b) in r.update.lora.items()})
                       for r, report in zip(results, folded.reports, strict=True) if report.bad is None])
        return folded

    trainer.server.fold = recording
    return rounds


def test_flora_merges_the_weighted_sum_of_client_products_into_the_frozen_weights(tmp_path):
    cfg = tiny_config(tmp_path, "--server.method", "flora")
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    base = {name: w.double() for name, w in trainer.model.base_state().items()}
    rounds = _spy_on_updates(trainer)
    trainer.run()

    assert len(rounds) == 2
    expected = dict(base)
    for updates in rounds:
        total = sum(weight for weight, _ in updates)
        for name in expected:
            expected[name] = expected[name] + trainer.model.scaling * sum(
                (weight / total) * lora[name][1].double() @ lora[name][0].double() for weight, lora in updates)
    merged = trainer.model.base_state()
    for name, weight in expected.items():
        assert (weight - base[name]).abs().max() > 1e-3  # the merges are far larger than the tolerance
        torch.testing.assert_close(merged[name].double(), weight, rtol=0, atol=1e-6)
    assert all(not b.any() for _, b in trainer.global_state.lora.values())  # clients restart from B = 0

    state = load_checkpoint(tmp_path / "checkpoints" / "round_00002.ckpt")
    assert all(torch.equal(state["base"][name], merged[name]) for name in merged)
    resumed = FederatedTrainer(tiny_config(tmp_path, "--server.method", "flora", "--resume", "auto",
                                           "--federation.rounds", "3"), trainer.fabric)
    assert resumed.start_or_resume() == 3
    assert all(torch.equal(resumed.model.base_state()[name], merged[name]) for name in merged)


def test_ffa_lora_never_changes_a(tmp_path):
    cfg = tiny_config(tmp_path, "--server.method", "ffa_lora")
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    initial = {name: a.clone() for name, (a, _) in trainer.global_state.lora.items()}
    rounds = _spy_on_updates(trainer)
    trainer.run()

    assert len(rounds) == 2
    for updates in rounds:
        for _, lora in updates:
            assert all(torch.equal(lora[name][0], initial[name]) for name in initial)
            assert any(b.any() for _, b in lora.values())  # B did train
    assert all(torch.equal(trainer.global_state.lora[name][0], initial[name]) for name in initial)
    assert all(torch.equal(a, initial[name]) for name, (a, _) in trainer.model.get_lora().items())


def readme_demo_table() -> tuple[int, dict[str, tuple[float, float, float]]]:
    """The demo table in README.md: its last round and, per domain and for the mean, (start, top-1, gain) in %."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"lorafair: global model after round (\d+)\n.*?\n-+.*?\n(.*?)\n```", readme, re.S)
    assert match, "README.md has no demo table"
    rows = {}
    for line in match.group(2).splitlines():
        name, start, final, gain = line.split()
        rows[name] = (float(start), float(final), float(gain))
    return int(match.group(1)), rows


def test_the_readmes_demo_table_adds_up():
    """The table the slow demo test holds the demo to: its mean row is the mean of the domains, each gain is final
    minus start (the printed rounding of the last digit aside)."""
    _, table = readme_demo_table()
    domains = [row for name, row in table.items() if name != "mean"]
    assert len(domains) == 6
    for start, final, gain in table.values():
        assert gain == pytest.approx(final - start, abs=0.011)
    means = [sum(values) / len(domains) for values in zip(*domains, strict=True)]
    assert table["mean"][:2] == pytest.approx(means[:2], abs=0.006)


@pytest.mark.slow
def test_the_demo_gives_the_readme_table(tmp_path):
    """configs/demo.yaml as `make demo` runs it gives the table the README shows, start and final. 2,000 test images
    a domain make one image 0.05 points: each domain within 1 point (another CPU's float rounding may flip a few
    images), the means within 0.3."""
    rounds, table = readme_demo_table()
    config = ROOT / "configs" / "demo.yaml"
    results = fit(parse_fit_args(["--config", str(config), "--out_dir", str(tmp_path)]))
    assert len(results["rounds"]) == rounds
    assert set(table) == {*results["final"]["accuracy"], "mean"}
    for name, (start, final, gain) in table.items():
        run_start = 100 * (results["start"]["mean_accuracy"] if name == "mean" else results["start"]["accuracy"][name])
        run_final = 100 * (results["final"]["mean_accuracy"] if name == "mean" else results["final"]["accuracy"][name])
        tolerance = 0.3 if name == "mean" else 1.0
        assert (run_start, run_final) == (pytest.approx(start, abs=tolerance), pytest.approx(final, abs=tolerance))
        assert gain == pytest.approx(final - start, abs=0.011)
