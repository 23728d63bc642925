"""Checkpoints that load but cannot be a run's state, checkpoints that all fail to load, and a disk that fills up
while a checkpoint or the export is written: each is one line naming the file, and nothing is trained or exported
from them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from lorafair.cli import main
from lorafair.errors import UserError
from lorafair.federated.checkpoints import CHECKSUM_KEY, content_digest, load_checkpoint


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
