"""Checkpoint files: atomic writes that keep the previous one, branches dropped on resume, the identity a resume
compares, records of earlier versions; and checkpoints that load but cannot be a run's state, checkpoints that all
fail to load, and a disk that fills up while a checkpoint or the export is written: each is one line naming the file,
and nothing is trained or exported from them."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lorafair import export, files
from lorafair.cli import main
from lorafair.config import FitConfig
from lorafair.errors import UserError
from lorafair.federated.checkpoints import (
    CHECKSUM_KEY,
    content_digest,
    identity_differences,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    read_round,
    save_checkpoint,
)
from lorafair.federated.run_folder import config_to_dict, flatten_config, trajectory_identity
from tests.helpers import tiny_args


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run's folder (without its export) to resume and export from."""
    out_dir, _ = tiny_run
    shutil.copytree(out_dir, tmp_path / "run", ignore=shutil.ignore_patterns("final", ".lorafair.lock"))
    return tmp_path / "run"


def _first_lora_a(state: dict) -> torch.Tensor:
    return next(iter(state["lora"].values()))["A"]


def _set_first_lora_a(state: dict, tensor: torch.Tensor) -> None:
    next(iter(state["lora"].values()))["A"] = tensor


def _nan_in_lora(state: dict) -> None:
    tensor = _first_lora_a(state).clone()
    tensor[0, 0] = float("nan")
    _set_first_lora_a(state, tensor)


def _inf_in_head(state: dict) -> None:
    state["extra"]["head.weight"] = torch.full_like(state["extra"]["head.weight"], float("inf"))


EDITS = {
    "string round": (lambda state: state.update(round="2"), "its round is '2' (str), not a whole number"),
    "negative round": (lambda state: state.update(round=-5), "its round is -5, not a round number"),
    "fp16 LoRA": (lambda state: _set_first_lora_a(state, _first_lora_a(state).half()), "is torch.float16"),
    "int64 LoRA": (lambda state: _set_first_lora_a(state, _first_lora_a(state).long()), "is torch.int64"),
    "NaN LoRA": (_nan_in_lora, "holds NaN or Inf values"),
    "Inf head": (_inf_in_head, "extra/head.weight holds NaN or Inf values"),
    "rank 0 client": (lambda state: state.update(client_ranks={3: 0}), "its client_ranks maps 3 to 0, not a client id"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_checkpoint_holding_what_no_run_writes_is_refused_naming_it(run_copy, tmp_path, capsys, edit):
    change, problem = EDITS[edit]
    newest = run_copy / "checkpoints" / "round_00002.ckpt"
    state = load_checkpoint(newest)
    change(state)

    # edited by hand, keeping the old checksum: damaged, as any changed byte is
    torch.save({**state, CHECKSUM_KEY: torch.load(newest, weights_only=True)[CHECKSUM_KEY]}, newest)
    with pytest.raises(UserError, match=r"round_00002\.ckpt is corrupt: its content does not match the checksum"):
        load_checkpoint(newest)

    # with a checksum that fits: read, then refused for what it holds, by fit (no round run) and by export
    torch.save({**state, CHECKSUM_KEY: content_digest(state)}, newest)
    before = sorted(path.name for path in (run_copy / "checkpoints").iterdir())
    results = (run_copy / "results.json").read_bytes()
    assert main(["fit", *tiny_args(run_copy, "--federation.rounds", "9"), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{newest} cannot be used: " in err and problem in err
    assert sorted(path.name for path in (run_copy / "checkpoints").iterdir()) == before  # no round_-0001.ckpt
    assert (run_copy / "results.json").read_bytes() == results

    out = tmp_path / "export"
    assert main(["export", "--run", str(run_copy), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{newest} cannot be used: " in err and problem in err
    assert not out.exists() and not list(tmp_path.glob(".export.*"))


def test_with_every_checkpoint_unreadable_resume_auto_says_so_in_one_line_and_starts_nothing(run_copy, capsys):
    checkpoints = run_copy / "checkpoints"
    (checkpoints / "round_00001.ckpt").write_bytes(b"not a checkpoint")
    newest = checkpoints / "round_00002.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    before = {path.name: path.read_bytes() for path in [*checkpoints.iterdir(), run_copy / "results.json"]}
    assert main(["fit", *tiny_args(run_copy), "--resume", "auto"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert f"none of the 2 checkpoint(s) in {checkpoints} can be read (round_00001.ckpt " in captured.err
    assert "; round_00002.ckpt cannot be read" in captured.err
    assert "restore them from a copy to resume, or pass --overwrite true to delete them and start over" in captured.err
    assert "starting from round 1" not in captured.out and "falling back" not in captured.out
    assert {path.name: path.read_bytes() for path in [*checkpoints.iterdir(), run_copy / "results.json"]} == before


class _FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room, self.written = handle, room, 0

    def write(self, data) -> int:
        data = bytes(data)
        if self.written + len(data) > self.room:
            self.handle.write(data[: self.room - self.written])
            self.written = self.room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.fileno()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_full_disk_while_writing_a_checkpoint_or_the_export_is_one_line_and_the_same_command_resumes(
        tiny_run, tmp_path, capsys, monkeypatch):
    _, uninterrupted = tiny_run
    run, command = tmp_path / "run", ["fit", *tiny_args(tmp_path / "run")]
    newest = run / "checkpoints" / "round_00002.ckpt"
    real_temporary = files.temporary_beside

    @contextlib.contextmanager
    def full_at_round_2(path):
        with real_temporary(path) as (handle, temporary):
            yield (_FullDisk(handle, 4096) if path == newest else handle), temporary

    with monkeypatch.context() as patch:
        patch.setattr(files, "temporary_beside", full_at_round_2)
        assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"no space left on the device to write {newest}; nothing was put in its place" in err
    assert "run the same command again" in err
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["round_00001.ckpt"]  # no partial file

    assert main(command) == 0  # space freed
    assert "resuming after round 1" in capsys.readouterr().out
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["final"] == json.loads(json.dumps(uninterrupted["final"]))
    exported = _files(run / "final")

    real_write = export.write_export

    def full_at_the_end(base, adapter, folder, save_model):
        real_write(base, adapter, folder, save_model)
        with (folder / "model.safetensors").open("wb") as half:
            half.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(export, "write_export", full_at_the_end)
        assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"no space left on the device to write the export {run / 'final'}; the earlier export there is " \
           "unchanged: free space, then run the same command again" in err
    assert _files(run / "final") == exported and not list(run.glob(".final.*"))

    (run / "final" / "model.safetensors").unlink()  # an export to redo: the same command writes it again
    assert main(command) == 0
    assert _files(run / "final").keys() == exported.keys()


def test_a_run_resumed_from_an_older_file_drops_the_later_checkpoints_it_branched_off(tmp_path):
    for round_index in (9, 10):
        save_checkpoint(tmp_path, round_index, {"round": round_index})
    save_checkpoint(tmp_path, 6, {"round": 6})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_00006.ckpt"]


def test_checkpoints_are_atomic_keep_the_previous_one_and_skip_unreadable_ones(tmp_path):
    for round_index in range(1, 5):
        save_checkpoint(tmp_path, round_index, {"round": round_index, "w": torch.full((3,), float(round_index))})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_00003.ckpt", "round_00004.ckpt"]

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, {"round": 5}, before_rename=interrupted)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_00003.ckpt", "round_00004.ckpt"]
    assert not list(tmp_path.glob("*.tmp"))  # the interrupted write's temporary is removed

    newest = tmp_path / "round_00004.ckpt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, e.g. by a full disk
    warnings = []
    path, state = load_latest(tmp_path, warnings.append)
    assert path.name == "round_00003.ckpt" and state["round"] == 3 and torch.equal(state["w"], torch.full((3,), 3.0))
    assert len(warnings) == 1 and "round_00004.ckpt cannot be read" in warnings[0]
    with pytest.raises(UserError, match=r"round_00004\.ckpt cannot be read"):
        load_checkpoint(newest)
    assert load_latest(tmp_path / "missing", warnings.append) is None


def test_identity_ignores_how_a_run_executes_but_not_what_it_computes():
    base = trajectory_identity(flatten_config(config_to_dict(FitConfig())), {"partition": "p"})
    longer = FitConfig()
    longer.federation.rounds, longer.data.num_workers, longer.out_dir = 99, 0, "elsewhere"
    same = trajectory_identity(flatten_config(config_to_dict(longer)), {"partition": "p"})
    assert identity_differences(base, same) == []
    other = FitConfig()
    other.server.method, other.lora.r = "fedit", 8
    changed = trajectory_identity(flatten_config(config_to_dict(other)), {"partition": "q"})
    assert identity_differences(base, changed) == [
        "lora.r: 16 -> 8", "partition: 'p' -> 'q'", "server.method: 'lorafair' -> 'fedit'"]


def test_a_checkpoint_of_an_earlier_version_gives_its_round_records_with_processes(tmp_path):
    """A run resumed from a checkpoint written before `ranks` became `processes` in the round records continues
    with records of this version's keys, so its results.json names them one way."""
    state = {"round": 1, "identity": {}, "lora": {"l": {"A": torch.zeros(2, 3), "B": torch.zeros(3, 2)}},
             "extra": {}, "base": {}, "results": {"rounds": [{"round": 1, "clients": [0], "ranks": {"0": 0}}]}}
    assert read_round(tmp_path / "round_00001.ckpt", state).records == [
        {"round": 1, "clients": [0], "processes": {"0": 0}}]
