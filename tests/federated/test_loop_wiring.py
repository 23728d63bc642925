"""The trainer does what its config and its server say: each test fails when one wire of the federation is cut
(the server's answer not kept, server options not passed on, an old run's outputs left behind, a resume file not
used, evaluation rounds or skipped images not reported).

Expectations come from outside the trainer: the aggregation library called directly on a round's updates, a plain
evaluation loop over the test sets, counts worked out by hand. The looks inside a run are the two functions below,
`server_calls` (what the aggregation library was given and answered, spied on its streaming round) and
`score_by_hand` (the run's backbone).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorafair.aggregation import Aggregator, ClientUpdate, RoundState, build_aggregator, method_options
from lorafair.cli import main
from lorafair.errors import UserError
from lorafair.federated import faults
from lorafair.federated.checkpoints import list_checkpoints, load_checkpoint
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.federated.run_folder import run_status
from lorafair.fit import fit
from tests.helpers import items_right_by_hand, tiny_args, tiny_config

pytestmark = pytest.mark.xdist_group("test_loop_wiring")
"""One pytest-xdist worker runs this module, so its module fixtures (runs of fit) are built once."""


@pytest.fixture
def server_calls(monkeypatch) -> list[tuple[Aggregator, list[ClientUpdate], object]]:
    """Every round the aggregation library finished during the test: (the aggregator, copies of the updates folded
    into the round, in slot order, and its answer)."""
    calls, folded = [], {}
    add, finish = RoundState.add, RoundState.finish

    def recording_add(self, update, slot=None):
        add(self, update, slot)
        lora = {n: (a.clone(), b.clone()) for n, (a, b) in update.lora.items()}
        copy = ClientUpdate(weight=update.weight, lora=lora, extra={n: t.clone() for n, t in update.extra.items()})
        this_round = folded.setdefault(id(self), [])
        this_round.append((len(this_round) if slot is None else slot, copy))

    def recording_finish(self):
        answer = finish(self)
        in_slot_order = sorted(folded.pop(id(self), []), key=lambda pair: pair[0])
        calls.append((self.aggregator, [update for _, update in in_slot_order], answer))
        return answer

    monkeypatch.setattr(RoundState, "add", recording_add)
    monkeypatch.setattr(RoundState, "finish", recording_finish)
    return calls


def score_by_hand(cfg, lora: dict, extra: dict) -> dict[str, float]:
    """Top-1 per domain of the config's backbone holding (lora, extra), one test set at a time as one batch."""
    right = items_right_by_hand(FederatedTrainer(cfg, launch_fabric(cfg)), lora, extra)
    return {domain: sum(items) / len(items) for domain, items in right.items()}


def checkpoint_state(out_dir: Path, round_index: int) -> tuple[dict, dict]:
    """(lora as name -> (A, B), extra) of a run's checkpoint after `round_index`."""
    state = load_checkpoint(out_dir / "checkpoints" / f"round_{round_index:05d}.ckpt")
    return {name: (pair["A"], pair["B"]) for name, pair in state["lora"].items()}, state["extra"]


def assert_same_tensors(got: dict, expected: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert list(got) == list(expected)
    for name, tensors in expected.items():
        for mine, theirs in zip(got[name] if isinstance(got[name], tuple) else (got[name],),
                                tensors if isinstance(tensors, tuple) else (tensors,), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=rtol, atol=atol)


# ---- the server's answer is the next global state -------------------------------------------------------------


def test_after_each_round_the_global_state_is_the_servers_answer_and_scores_as_reported(tmp_path, server_calls):
    """FedIT: the checkpoint (what a resumed run's clients start from, and resumed runs equal uninterrupted ones)
    holds the aggregate of that round, and results.json's accuracies are what that state scores."""
    cfg = tiny_config(tmp_path, "--server.method", "fedit")
    results = fit(cfg)
    assert len(server_calls) == 2
    for round_index, (_, updates, answer) in enumerate(server_calls, start=1):
        lora, extra = checkpoint_state(tmp_path, round_index)
        assert_same_tensors(lora, answer.lora)
        assert_same_tensors(extra, answer.extra)
        total = sum(u.weight for u in updates)  # FedIT by hand: the sample-weighted mean of the factors
        for name, (lora_a, lora_b) in lora.items():
            torch.testing.assert_close(lora_b, sum(u.weight / total * u.lora[name][1] for u in updates))
            torch.testing.assert_close(lora_a, sum(u.weight / total * u.lora[name][0] for u in updates))
    assert any(b.abs().max() > 1e-4 for _, b in checkpoint_state(tmp_path, 1)[0].values())  # B left zero

    hand = score_by_hand(tiny_config(tmp_path / "scoring"), *checkpoint_state(tmp_path, 2))
    assert results["final"]["accuracy"] == hand
    assert results["final"]["mean_accuracy"] == pytest.approx(sum(hand.values()) / len(hand), abs=1e-12)


def test_server_options_reach_the_aggregator_and_decide_the_answer(tmp_path, server_calls):
    """`--server.objective frobenius --server.lam 5` through the CLI equals the library called with those options
    on the same updates, and differs from the library's defaults."""
    assert main(["fit", *tiny_args(tmp_path, "--federation.rounds", "1", "--server.objective", "frobenius",
                                   "--server.lam", "5")]) == 0
    (_, updates, _), = server_calls
    expected = build_aggregator("lorafair", objective="frobenius", lam=5.0).aggregate(updates)
    lora, extra = checkpoint_state(tmp_path, 1)
    # the round folds raw example counts and the one-shot call normalises them first: float32 rounding only
    assert_same_tensors(lora, expected.lora, rtol=1e-5, atol=1e-7)
    assert_same_tensors(extra, expected.extra, rtol=1e-5, atol=1e-7)
    default = build_aggregator("lorafair").aggregate(updates)
    change = torch.cat([(default.lora[n][1] - b).flatten() for n, (_, b) in lora.items()])
    size = torch.cat([b.flatten() for _, b in lora.values()])
    assert change.norm() > 1e-5 * size.norm()  # far above float32 rounding: the options change the answer


@pytest.mark.parametrize(("method", "options"), [
    ("lorafair", {"lam": 0.5, "objective": "column_cosine", "steps": 7, "lr": 0.02, "init": "xavier",
                  "residual_on": "A", "relative": False, "lower_ranks": "zero_pad"}),
    ("florana", {"sweeps": 3}),
    ("fedsvd", {"svd_period": 2, "svd_warmup": 1}),
    ("hetlora", {"prune_gamma": 0.5, "prune_penalty": 2.0, "prune_threshold": 0.9}),
])
def test_every_server_option_reaches_the_aggregator(tmp_path, server_calls, method, options):
    assert set(options) == set(method_options(method)) - {"seed"}  # a new option needs a case here
    flags = [item for name, value in options.items() for item in (f"--server.{name}", json.dumps(value).strip('"'))]
    fit(tiny_config(tmp_path, "--server.method", method, *flags))
    assert len(server_calls) == 2
    for aggregator, _, _ in server_calls:
        assert {name: getattr(aggregator, name) for name in options} == options
    if method == "lorafair":  # its random start is drawn anew each round
        assert server_calls[0][0].seed != server_calls[1][0].seed


def test_lorafair_without_server_steps_is_fedit(tiny_run, tmp_path):
    """With no SGD step, LoRA-FAIR's corrected B is the averaged B (init zero): the run is FedIT's, exactly. (The
    absolute form: the relative one rescales B_bar by ||B_bar|| and back, which can move its last bit.)"""
    fedit = fit(tiny_config(tmp_path / "fedit", "--server.method", "fedit"))
    lorafair = fit(tiny_config(tmp_path / "lorafair", "--server.steps", "0", "--server.relative", "false"))
    assert lorafair["final"] == fedit["final"]
    for mine, theirs in zip(lorafair["rounds"], fedit["rounds"], strict=True):
        assert (mine["train_loss"], mine["accuracy"]) == (theirs["train_loss"], theirs["accuracy"])
    assert tiny_run[1]["rounds"][1]["train_loss"] != fedit["rounds"][1]["train_loss"]  # 50 steps do change it


# ---- the run folder -----------------------------------------------------------------------------------------------


def test_a_fresh_run_removes_the_outputs_of_an_earlier_run_only_with_overwrite(tiny_run, tmp_path, monkeypatch,
                                                                               capsys):
    """An earlier finished run lies in out_dir. A new run without --overwrite is refused and deletes nothing; with
    --overwrite true it stops in its first round, and nothing of the earlier run may remain to be resumed or read as
    this run's result."""
    out_dir, uninterrupted = tiny_run
    shutil.copytree(out_dir / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(out_dir / "results.json", tmp_path / "results.json")
    assert main(["fit", *tiny_args(tmp_path, "--resume", "null")]) == 2
    assert "holds an earlier run (2 checkpoint(s)); pass --resume auto" in capsys.readouterr().err
    assert len(list_checkpoints(tmp_path / "checkpoints")) == 2 and run_status(tmp_path) == "done"

    monkeypatch.setenv(faults.POISON_ENV_VAR, ",".join(f"1:{client}" for client in range(6)))
    assert main(["fit", *tiny_args(tmp_path, "--federation.on_bad_update", "error", "--overwrite", "true")]) == 2
    assert list_checkpoints(tmp_path / "checkpoints") == []
    assert not (tmp_path / "results.json").exists()
    assert run_status(tmp_path) == "new"

    monkeypatch.delenv(faults.POISON_ENV_VAR)
    capsys.readouterr()
    resumed = fit(tiny_config(tmp_path, "--resume", "auto"))
    assert "starting from round 1" in capsys.readouterr().out
    assert resumed["final"] == uninterrupted["final"]


def test_resuming_from_a_named_checkpoint_file_continues_that_run(tiny_run, tmp_path, capsys):
    out_dir, uninterrupted = tiny_run
    path = out_dir / "checkpoints" / "round_00001.ckpt"
    assert main(["fit", *tiny_args(tmp_path, "--resume", str(path))]) == 0
    assert f"resuming after round 1 from {path}" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["final"] == uninterrupted["final"]
    for mine, theirs in zip(resumed["rounds"], uninterrupted["rounds"], strict=True):
        for key in ("round", "clients", "train_loss", "accuracy"):
            assert mine[key] == theirs[key]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["round_00002.ckpt"]


# ---- what results.json reports --------------------------------------------------------------------------------


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (value, 255 - value, (7 * value) % 256)).save(path)


def write_image_tree(root: Path) -> Path:
    """Two image-folder domains, a and b, of 2 classes with 4 training and 2 test images each, listed in split
    files; one of domain a's training images is corrupt."""
    for domain in ("a", "b"):
        train, test = [], []
        for label in ("c0", "c1"):
            for i in range(6):
                relative = f"{domain}/{label}/{i}.png"
                write_png(root / relative, 40 * i + (100 if label == "c1" else 0))
                (train if i < 4 else test).append(relative)
        (root / f"{domain}_train.txt").write_text("\n".join(train) + "\n")
        (root / f"{domain}_test.txt").write_text("\n".join(test) + "\n")
    (root / "a" / "c1" / "2.png").write_bytes(b"not a png")
    return root


def folders_args(root: Path) -> list[str]:
    return ["--data.name", "folders", "--data.root", str(root), "--data.on_bad_image", "skip",
            "--federation.clients_per_round", "null"]


@pytest.fixture(scope="module")
def folders_run(tmp_path_factory) -> tuple[Path, dict]:
    """3 rounds, eval_every 2, on the image tree above. Each round: 1 local epoch of 1 batch per client, so the
    corrupt image is read once a round."""
    root = write_image_tree(tmp_path_factory.mktemp("images"))
    out_dir = tmp_path_factory.mktemp("folders_run")
    fit(tiny_config(out_dir, *folders_args(root), "--federation.rounds", "3", "--federation.eval_every", "2"))
    return out_dir, json.loads((out_dir / "results.json").read_text())


def test_eval_every_evaluates_its_multiples_and_the_last_round(folders_run):
    _, results = folders_run
    assert [("accuracy" in record, "mean_accuracy" in record) for record in results["rounds"]] == [
        (False, False), (True, True), (True, True)]
    assert results["final"]["round"] == 3
    # 4 test images per domain: every accuracy is a multiple of 1/4
    assert all((4 * acc).is_integer() for acc in results["final"]["accuracy"].values())


def test_skipped_images_are_counted_in_results(folders_run):
    _, results = folders_run
    assert [record["skipped_images"] for record in results["rounds"]] == [1, 1, 1]
    assert all(steps == 1 for record in results["rounds"] for steps in record["train_steps"].values())


def test_resuming_after_the_dataset_changed_behind_the_same_config_is_refused(tmp_path):
    root = write_image_tree(tmp_path / "images")
    fit(tiny_config(tmp_path / "run", *folders_args(root), "--federation.rounds", "1"))
    lines = (root / "b_train.txt").read_text().splitlines()
    (root / "b_train.txt").write_text("\n".join(lines[1:]) + "\n")  # one training image fewer
    with pytest.raises(UserError, match=r"round_00001\.ckpt was written by a run with other settings \(.*partition: "
                                        r"'2 clients, 16 samples, sha256 \w+' -> '2 clients, 15 samples"):
        fit(tiny_config(tmp_path / "run", *folders_args(root), "--federation.rounds", "2", "--resume", "auto"))
