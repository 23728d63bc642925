"""Faults and bad input: kills at every point of a round resume exactly, damaged checkpoints fall back to the
previous one, bad client updates are dropped (the rest re-weighted), changed settings and unsafe files are refused;
the fault injection checks its own setting."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorafair.cli import main
from lorafair.errors import UserError
from lorafair.federated import faults
from lorafair.federated.checkpoints import (
    content_digest,
    first_shape_mismatch,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from lorafair.federated.fingerprints import partition_fingerprint
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.federated.state import ClientResult, ServerAnswer
from lorafair.fit import fit
from tests.helpers import assert_same_trajectory, fit_in_subprocess, tiny_args, tiny_config

KILL_POINTS = ["1:checkpoint", *(f"2:{phase}" for phase in faults.PHASES)]
"""Every phase of round 2 (resumed from round 1's checkpoint), and round 1's checkpoint write (nothing to resume:
the run starts over although results.json already holds round 1)."""


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", KILL_POINTS)
def test_a_run_killed_at_any_point_of_a_round_resumes_exactly(tiny_run, tmp_path, capsys, fail_at):
    _, uninterrupted = tiny_run
    killed = fit_in_subprocess(tiny_args(tmp_path), LORAFAIR_FAIL_AT=fail_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    kill_round, phase = int(fail_at.split(":")[0]), fail_at.split(":")[1]
    complete = [path.name for path in list_checkpoints(tmp_path / "checkpoints")]
    assert complete == [f"round_{r:05d}.ckpt" for r in range(1, kill_round)]  # the previous one survives
    temporaries = list((tmp_path / "checkpoints").glob(f".round_{kill_round:05d}.ckpt.*.tmp"))
    assert len(temporaries) == (phase == "checkpoint")

    resumed = fit(tiny_config(tmp_path, "--resume", "auto"))
    out = capsys.readouterr().out
    assert ("resuming after round 1" in out) == (kill_round == 2)
    assert_same_trajectory(resumed, uninterrupted)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(resumed))


def _flip_a_tensor_byte(path: Path) -> None:
    """Change one byte of the head bias inside the file, leaving the zip container readable."""
    data = bytearray(path.read_bytes())
    bias = load_checkpoint(path)["extra"]["head.bias"].numpy().tobytes()
    at = data.find(bias)
    assert at >= 0 and data.find(bias, at + 1) == -1
    data[at + 1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_run, tmp_path, capsys, damage):
    out_dir, uninterrupted = tiny_run
    shutil.copytree(out_dir / "checkpoints", tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / "round_00002.ckpt"
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        _flip_a_tensor_byte(newest)
        assert torch.load(newest, weights_only=True)["round"] == 2  # torch alone would not notice
        with pytest.raises(UserError, match=r"round_00002\.ckpt is corrupt: its content does not match the checksum"):
            load_checkpoint(newest)

    resumed = fit(tiny_config(tmp_path, "--resume", "auto"))
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if "falling back to the previous checkpoint" in line)
    assert str(newest) in warning
    assert "resuming after round 1" in out
    assert_same_trajectory(resumed, uninterrupted)


def test_the_checksum_covers_every_value_key_and_dtype(tmp_path):
    state = {"round": 3, "results": {"rounds": [{"loss": 0.25}]}, "lora": {"a": torch.arange(6.0).view(2, 3)}}
    digest = content_digest(state)
    assert content_digest({**state}) == digest
    for changed in ({**state, "round": 4}, {**state, "results": {"rounds": [{"loss": 0.5}]}},
                    {**state, "lora": {"a": torch.arange(6.0).view(3, 2)}},
                    {**state, "lora": {"a": torch.arange(6.0, dtype=torch.float64).view(2, 3)}},
                    {**state, "lora": {"b": torch.arange(6.0).view(2, 3)}}):
        assert content_digest(changed) != digest
    path = save_checkpoint(tmp_path, 3, state)
    loaded = load_checkpoint(path)
    assert list(loaded) == ["round", "results", "lora"] and torch.equal(loaded["lora"]["a"], state["lora"]["a"])


class _Pickled:
    """Any class: a checkpoint holding one must be refused, not executed."""


def test_a_checkpoint_holding_a_python_object_is_refused(tmp_path, capsys):
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"round": 1, "payload": _Pickled()}, unsafe)
    with pytest.raises(UserError, match=r"unsafe\.ckpt holds Python objects other than tensors .* weights_only=True"):
        load_checkpoint(unsafe)
    assert main(["fit", *tiny_args(tmp_path / "run"), "--resume", str(unsafe)]) == 2
    err = capsys.readouterr().err
    assert "unsafe.ckpt holds Python objects" in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def round_one_updates(tmp_path_factory):
    """A trainer of the tiny job with all 6 clients per round, and the client results of its round 1."""
    cfg = tiny_config(tmp_path_factory.mktemp("updates"), "--federation.clients_per_round", "null")
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    results = [trainer.client.train(client, trainer.global_state, 1) for client in trainer.data.clients]
    return trainer, results


def _with(results: list[ClientResult], position: int, **changes) -> list[ClientResult]:
    """A copy of `results` whose result at `position` has its fields (and its update's tensors) changed."""
    copied = [dataclasses.replace(r, update=dataclasses.replace(r.update, lora={n: (a.clone(), b.clone()) for n, (a, b)
                                                                             in r.update.lora.items()}))
              for r in results]
    copied[position] = dataclasses.replace(copied[position], **changes)
    return copied


def _aggregate(trainer: FederatedTrainer, results: list[ClientResult]) -> ServerAnswer:
    """Round 1's server answer (lorafair rebuilds its aggregator from the round's seed, so reruns agree)."""
    return trainer.aggregate(1, results, [result.client for result in results])


@pytest.mark.parametrize("fault", ["nan update", "inf update", "inf loss", "nan loss"])
def test_dropping_a_bad_client_equals_aggregating_the_good_ones_alone(round_one_updates, capsys, fault):
    trainer, results = round_one_updates
    victim = 2
    value = float(fault.split()[0])
    if fault.endswith("update"):
        bad = _with(results, victim)
        _, B = bad[victim].update.lora[next(iter(bad[victim].update.lora))]
        B.view(-1)[B.numel() // 2] = value
    else:
        bad = _with(results, victim, train_loss=value)
    answer = _aggregate(trainer, bad)
    alone = _aggregate(trainer, [r for i, r in enumerate(results) if i != victim])

    tensors, alone_tensors = answer.to_wire()[0], alone.to_wire()[0]
    assert list(tensors) == list(alone_tensors) and all(torch.equal(tensors[k], alone_tensors[k]) for k in tensors)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    record = answer.record
    assert list(record.bad_updates) == [str(victim)] and not record.skipped
    assert ("NaN or Inf" in record.bad_updates[str(victim)]) == fault.endswith("update")
    def untimed(metrics):
        return {name: value for name, value in metrics.items() if not name.endswith("seconds")}

    assert untimed(record.aggregation) == untimed(alone.record.aggregation)
    assert f"warning: round 1: dropping 1 bad update(s), the others are re-weighted: client {victim}:" in (
        capsys.readouterr().out)


def test_an_all_bad_round_keeps_the_global_state_and_error_mode_stops(round_one_updates):
    trainer, results = round_one_updates
    poisoned = results
    for position in range(len(results)):
        poisoned = _with(poisoned, position)
        A, _ = poisoned[position].update.lora[next(iter(poisoned[position].update.lora))]
        A.view(-1)[0] = float("nan")
    answer = _aggregate(trainer, poisoned)
    assert answer.to_wire()[0] == {} and answer.record.skipped
    assert len(answer.record.bad_updates) == 6
    before = {name: (a.clone(), b.clone()) for name, (a, b) in trainer.global_state.lora.items()}
    head = {name: t.clone() for name, t in trainer.global_state.extra.items()}
    trainer.apply(1, answer)
    assert all(torch.equal(trainer.global_state.lora[n][i], before[n][i]) for n in before for i in (0, 1))
    assert all(torch.equal(trainer.global_state.extra[n], head[n]) for n in head)

    trainer.server.on_bad_update = "error"
    try:
        with pytest.raises(UserError, match=r"^round 1: bad client update \(client 0: NaN or Inf in .*; client 2:"
                                            r".*federation.on_bad_update=error stops the run"):
            trainer.transport.from_server(lambda: _aggregate(trainer, poisoned[:3]), ServerAnswer)
    finally:
        trainer.server.on_bad_update = "drop"


def test_poisoned_clients_are_dropped_counted_and_logged(tiny_run, tmp_path, monkeypatch, capsys):
    """LORAFAIR_POISON end to end: one bad client in round 1, every client bad in round 2."""
    _, clean = tiny_run
    victim = clean["rounds"][0]["clients"][0]
    poison = [f"1:{victim}", *(f"2:{client}" for client in range(6))]
    monkeypatch.setenv(faults.POISON_ENV_VAR, ",".join(poison))
    results = fit(tiny_config(tmp_path))
    first, second = results["rounds"]
    assert list(first["bad_updates"]) == [str(victim)] and not first["skipped"]
    clean_first = clean["rounds"][0]
    assert first["train_loss"] == clean_first["train_loss"]  # the poison spoils the update, not the training
    untimed = {name for name in first["aggregation"] if name != "solve_seconds"}
    assert untimed and any(first["aggregation"][name] != clean_first["aggregation"][name] for name in untimed)
    assert len(second["bad_updates"]) == 5 and second["skipped"] and second["bytes_down"] == 0
    assert second["accuracy"] == first["accuracy"]  # the skipped round left the global model as it was
    assert results["bad_updates_total"] == 6
    assert json.loads((tmp_path / "results.json").read_text())["bad_updates_total"] == 6
    out = capsys.readouterr().out
    assert "warning: round 1: dropping 1 bad update(s)" in out
    assert "warning: round 2: no usable update, the global model stays as it was" in out

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("bad_updates")] == [(1, 1), (2, 5)]
    assert [(e.step, e.value) for e in events.Scalars("bad_updates_total")] == [(1, 1), (2, 6)]


def test_fault_settings_are_checked(monkeypatch):
    monkeypatch.setenv(faults.POISON_ENV_VAR, "1:2,3")
    with pytest.raises(ValueError, match="expected ROUND:CLIENT"):
        faults.is_poisoned(1, 2)
    monkeypatch.setenv(faults.POISON_ENV_VAR, "1:2,3:4")
    assert faults.is_poisoned(3, 4) and not faults.is_poisoned(1, 4)
    monkeypatch.setenv(faults.ENV_VAR, "1:train")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    faults.maybe_fail(1, "train")  # a restarted job: the fault fired already, nothing happens


@pytest.fixture
def finished_run(tiny_run, tmp_path):
    """A copy of the tiny run's folder to resume from."""
    out_dir, _ = tiny_run
    shutil.copytree(out_dir / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


@pytest.mark.parametrize(("change", "differences"), [
    (["--server.method", "fedit"], ["server.method: 'lorafair' -> 'fedit'"]),
    (["--lora.r", "8"], ["lora.r: 4 -> 8"]),
    (["--model.kwargs", "{depth: 3, embed_dim: 32, num_heads: 2, img_size: 16, patch_size: 4}"],
     ["model.kwargs: {'depth': 2,", "-> {'depth': 3,"]),
    (["--federation.partition", "iid"], ["federation.partition: 'feature' -> 'iid'", "partition: '6 clients, "]),
    (["--seed", "1"], ["seed: 0 -> 1", "partition: '6 clients"]),
])
def test_resuming_with_other_settings_is_refused_listing_the_differences(finished_run, change, differences):
    cfg = tiny_config(finished_run, "--resume", "auto", *change)
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    with pytest.raises(UserError, match=r"round_00002\.ckpt was written by a run with other settings") as refused:
        trainer.start_or_resume()
    message = str(refused.value)
    assert all(difference in message for difference in differences)
    assert "--resume_force true" in message and "\n" not in message


def test_a_forced_resume_continues_when_the_tensors_fit_and_names_the_first_one_that_does_not(finished_run, capsys):
    forced = fit(tiny_config(finished_run, "--resume", "auto", "--resume_force", "true", "--server.method", "fedit",
                             "--federation.rounds", "3"))
    assert [record["round"] for record in forced["rounds"]] == [1, 2, 3] and forced["final"]["round"] == 3
    assert "warning: resume_force: continuing from" in capsys.readouterr().out

    cfg = tiny_config(finished_run, "--resume", "auto", "--resume_force", "true", "--lora.r", "8",
                      "--federation.rounds", "3")
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    with pytest.raises(UserError, match=r"round_00003\.ckpt does not fit this model: lora/blocks\.0\.\S+/A has shape "
                                        r"\(4, 32\) in the checkpoint but \(8, 32\) in this model"):
        trainer.start_or_resume()


def test_shape_and_partition_checks():
    expected = {"a": torch.Size([2, 3]), "b": torch.Size([4])}
    assert first_shape_mismatch({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, expected) is None
    assert first_shape_mismatch({"a": torch.zeros(3, 2), "b": torch.zeros(5)}, expected) == (
        "a has shape (3, 2) in the checkpoint but (2, 3) in this model")
    assert first_shape_mismatch({"a": torch.zeros(2, 3)}, expected) == "b is missing from the checkpoint"
    assert first_shape_mismatch({**{"c": torch.zeros(1)}, "a": torch.zeros(2, 3), "b": torch.zeros(4)},
                                expected) == "c is in the checkpoint but not in this model"
    clients = [(0, "plain", 10, [5, 5]), (1, "noisy", 12, [6, 6])]
    label = partition_fingerprint(clients)
    assert label.startswith("2 clients, 22 samples, sha256 ") and partition_fingerprint(list(clients)) == label
    assert partition_fingerprint([clients[0], (1, "noisy", 12, [7, 5])]) != label


def test_more_clients_per_round_than_clients_is_one_line_exit_2(tmp_path):
    done = fit_in_subprocess(tiny_args(tmp_path, "--federation.clients_per_round", "7"))
    assert done.returncode == 2
    assert done.stderr == ("lorafair: error: federation.clients_per_round: 7 is more than the 6 clients of this "
                           "partition; lower it (or null for all)\n")


def test_fault_injection_checks_its_setting(monkeypatch):
    monkeypatch.setenv(faults.ENV_VAR, "2:nowhere")
    with pytest.raises(ValueError, match="PHASE one of train, gather"):
        faults.maybe_fail(1, "train")
    monkeypatch.setenv(faults.ENV_VAR, "2:train:1")
    monkeypatch.delenv("RANK", raising=False)
    faults.maybe_fail(2, "train")  # another rank (0): nothing happens
    monkeypatch.setenv("RANK", "1")
    faults.maybe_fail(1, "train")  # another round: nothing happens
