"""Re-running the same command never loses work: it continues, or refuses naming the flags; only --overwrite deletes.
The run folder is lorafair's (markers, locks, unusable folders as one line), and its plain records (flattened
config, means, the accuracy table)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lorafair import export
from lorafair.cli import main
from lorafair.config import FitConfig
from lorafair.federated.checkpoints import (
    list_checkpoints,
)
from lorafair.federated.loop import FederatedTrainer
from lorafair.federated.run_folder import (
    EXPORT_MARKER,
    EXPORT_NAME,
    LOCK_NAME,
    RUN_MARKER,
    accuracy_table,
    claim_run_folder,
    config_to_dict,
    flatten_config,
    foreign_entries,
    is_export,
    mean,
    results_problem,
)
from lorafair.files import temporary_beside, write_text_atomic
from lorafair.fit import fit
from tests.helpers import fit_in_subprocess, one_error_line, tiny_args, tiny_config


@pytest.mark.slow
def test_a_killed_run_relaunched_by_the_same_command_continues_exactly(tiny_run, tmp_path):
    _, uninterrupted = tiny_run
    killed = fit_in_subprocess(tiny_args(tmp_path), LORAFAIR_FAIL_AT="2:train")
    assert killed.returncode == -signal.SIGKILL
    assert [path.name for path in list_checkpoints(tmp_path / "checkpoints")] == ["round_00001.ckpt"]
    again = fit_in_subprocess(tiny_args(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming after round 1" in again.stdout
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["final"] == uninterrupted["final"]
    assert [r["train_loss"] for r in resumed["rounds"]] == [r["train_loss"] for r in uninterrupted["rounds"]]


@pytest.fixture
def earlier_run(tiny_run, tmp_path):
    """A copy of the tiny run's checkpoints, finished results.json, run marker and lock file."""
    out_dir, _ = tiny_run
    (tmp_path / "checkpoints").mkdir()
    for path in list_checkpoints(out_dir / "checkpoints"):
        (tmp_path / "checkpoints" / path.name).write_bytes(path.read_bytes())
    for name in ("results.json", RUN_MARKER, LOCK_NAME):
        (tmp_path / name).write_bytes((out_dir / name).read_bytes())
    return tmp_path


@pytest.mark.parametrize("keep", ["checkpoints and results", "finished results only"])
def test_a_new_run_over_an_earlier_one_is_refused_naming_both_flags(earlier_run, capsys, keep):
    if keep == "finished results only":
        for path in list_checkpoints(earlier_run / "checkpoints"):
            path.unlink()
    before = sorted(p.name for p in earlier_run.rglob("*"))
    assert main(["fit", *tiny_args(earlier_run), "--resume", "null"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"out_dir {earlier_run} holds an earlier run" in err and "--resume auto" in err and "--overwrite true" in err
    assert sorted(p.name for p in earlier_run.rglob("*")) == before  # nothing deleted
    if keep == "finished results only":  # the default (auto) finds no checkpoint and refuses too
        assert main(["fit", *tiny_args(earlier_run)]) == 2
        assert "holds an earlier run (the finished results.json)" in capsys.readouterr().err


def test_overwrite_deletes_the_earlier_run_and_starts_over(earlier_run, capsys):
    earlier = json.loads((earlier_run / "results.json").read_text())
    assert main(["fit", *tiny_args(earlier_run, "--federation.rounds", "1", "--overwrite", "true")]) == 0
    out = capsys.readouterr().out
    assert f"starting a new run in {earlier_run}: deleting 2 checkpoint(s)" in out
    assert [path.name for path in list_checkpoints(earlier_run / "checkpoints")] == ["round_00001.ckpt"]
    results = json.loads((earlier_run / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1] and "final" in results
    for key in ("clients", "train_loss", "accuracy"):  # round 1 trained again from the start, not resumed
        assert results["rounds"][0][key] == earlier["rounds"][0][key]


def test_overwrite_with_a_checkpoint_path_is_a_config_error(earlier_run, capsys):
    checkpoint = list_checkpoints(earlier_run / "checkpoints")[0]
    assert main(["fit", *tiny_args(earlier_run, "--resume", str(checkpoint), "--overwrite", "true")]) == 2
    assert "overwrite: starts a new run, which contradicts --resume" in capsys.readouterr().err


def test_temporary_files_have_unique_names_plain_permissions_and_vanish_on_error(tmp_path):
    target = tmp_path / "config.yaml"
    with temporary_beside(target) as (_, first), temporary_beside(target) as (_, second):
        assert first != second and first.parent == second.parent == tmp_path  # two writers never share a file
        assert first.name.startswith(".config.yaml.") and first.name.endswith(".tmp")
        first.unlink()
        second.unlink()
    mask = os.umask(0o027)
    try:
        write_text_atomic(target, "a: 1\n")
        assert (target.stat().st_mode & 0o777) == 0o640  # what open() gives under this umask, not mkstemp's 0600
        with pytest.raises(OSError), temporary_beside(target) as (handle, _):
            handle.write(b"half")
            raise OSError("disk full")
    finally:
        os.umask(mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"] and target.read_text() == "a: 1\n"


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("foreign", ["a file of its own", "a results.json of something else", "an export folder"])
def test_fit_refuses_a_folder_holding_what_lorafair_did_not_write_and_changes_nothing(tmp_path, capsys, foreign):
    if foreign == "a file of its own":
        (tmp_path / "final").mkdir()
        (tmp_path / "final" / "thesis.txt").write_text("four years")
        (tmp_path / "notes.txt").write_text("mine")
    elif foreign == "a results.json of something else":
        (tmp_path / "results.json").write_text('{"accuracy": 0.93}')
    else:
        for name in ("config.json", "model.safetensors", "README.md"):
            (tmp_path / name).write_text("x")
    before = _tree(tmp_path)
    err = _refused(["fit", *tiny_args(tmp_path)], capsys)
    assert f"out_dir {tmp_path} holds files lorafair did not write" in err and RUN_MARKER in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("where", ["root", "home"])
def test_fit_refuses_the_root_and_the_home_folder(tmp_path, capsys, monkeypatch, where):
    monkeypatch.setenv("HOME", str(tmp_path))
    out_dir = "/" if where == "root" else str(tmp_path)
    err = _refused(["fit", *tiny_args(out_dir)], capsys)
    assert f"out_dir: {out_dir} is {'the root folder' if where == 'root' else 'your home folder'}" in err
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_carries_the_marker_and_an_unmarked_earlier_run_is_taken_over(tiny_run, earlier_run):
    assert (tiny_run[0] / RUN_MARKER).is_file()
    (earlier_run / RUN_MARKER).unlink()  # a run folder written before the marker existed
    assert foreign_entries(earlier_run) == []
    claim_run_folder(earlier_run)
    assert (earlier_run / RUN_MARKER).is_file()
    (earlier_run / "mine.txt").write_text("a marked folder keeps what else it holds")
    claim_run_folder(earlier_run)
    assert (earlier_run / "mine.txt").is_file()


@pytest.mark.parametrize("out", ["the run folder", "its parent", "a folder of other files"])
def test_export_overwrite_replaces_only_an_earlier_export(tiny_run, tmp_path, capsys, out):
    run_dir = tiny_run[0]
    assert is_export(run_dir / EXPORT_NAME)  # fit's own export carries the marker
    target = {"the run folder": run_dir, "its parent": run_dir.parent, "a folder of other files": tmp_path}[out]
    (tmp_path / "thesis.txt").write_text("four years")
    before = _tree(target)
    err = _refused(["export", "--run", str(run_dir), "--out", str(target), "--overwrite"], capsys)
    assert f"{target} is not a lorafair export (no {EXPORT_MARKER} in it)" in err
    assert _tree(target) == before


def test_fit_refuses_a_final_folder_that_is_not_its_export_before_training(earlier_run, capsys):
    (earlier_run / EXPORT_NAME).mkdir()
    (earlier_run / EXPORT_NAME / "thesis.txt").write_text("four years")
    before = _tree(earlier_run)
    err = _refused(["fit", *tiny_args(earlier_run)], capsys)
    assert f"holds a {EXPORT_NAME}/ that is not a lorafair export" in err
    assert _tree(earlier_run) == before


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1], timeout=0)
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def _busy(folder: Path) -> bool:
    """Whether another process holds the lock of `folder` (tried from a process of its own)."""
    probe = "import sys\nfrom filelock import FileLock, Timeout\ntry:\n FileLock(sys.argv[1], timeout=0).acquire()\n" \
            "except Timeout:\n sys.exit(3)\n"
    return subprocess.run([sys.executable, "-c", probe, str(folder / LOCK_NAME)]).returncode == 3


def test_a_second_process_on_a_locked_run_folder_fails_at_once_naming_it(tiny_run, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        err = _refused(["fit", *tiny_args(tmp_path)], capsys)
        assert f"{tmp_path} is in use by another lorafair process" in err and "--out_dir another folder" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # no marker, config or results written
        compare_err = _refused(["compare", *tiny_args(tmp_path), "--methods", "fedit"], capsys)
        assert "is in use by another lorafair process" in compare_err
    finally:
        holder.kill()
        holder.wait()
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        err = _refused(["export", "--run", str(run_dir), "--overwrite"], capsys)
        assert f"{run_dir} is in use by another lorafair process" in err and "--run another folder" in err
    finally:
        holder.kill()
        holder.wait()


def test_fit_holds_its_folder_locked_from_its_start_to_its_export(tmp_path, monkeypatch):
    busy = []
    run_round, export_folder = FederatedTrainer.run_round, export._write_export_folder

    def checking_round(trainer, round_index):
        busy.append(("round", _busy(tmp_path)))
        return run_round(trainer, round_index)

    def checking_export(run, out, client):
        busy.append(("export", _busy(tmp_path)))
        return export_folder(run, out, client)

    monkeypatch.setattr(FederatedTrainer, "run_round", checking_round)
    monkeypatch.setattr(export, "_write_export_folder", checking_export)
    fit(tiny_config(tmp_path, "--federation.rounds", "1", "--federation.clients_per_round", "2"))
    assert busy == [("round", True), ("export", True)]
    assert not _busy(tmp_path)  # released once fit returns


def test_export_false_writes_no_final_folder_and_a_resume_is_free_to_change_it(tmp_path, capsys):
    """--export false skips final/ (twice the backbone's size) and nothing else: results.json, the checkpoints and
    TensorBoard are there, and `lorafair export` writes final/ later. The setting changes no result, so the same
    run resumed with the export on continues rather than being refused as another run."""
    assert main(["fit", *tiny_args(tmp_path, "--federation.rounds", "1", "--export", "false")]) == 0
    assert "export false: no final/ written; `lorafair export --run" in capsys.readouterr().out
    assert not (tmp_path / EXPORT_NAME).exists()
    assert "final" in json.loads((tmp_path / "results.json").read_text())
    assert list_checkpoints(tmp_path / "checkpoints") and (tmp_path / "tensorboard").is_dir()
    assert main(["fit", *tiny_args(tmp_path)]) == 0  # two rounds, export on: the run continues and exports
    assert "resuming after round 1" in capsys.readouterr().out
    assert is_export(tmp_path / EXPORT_NAME)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [record["round"] for record in results["rounds"]] == [1, 2] and results["final"]["round"] == 2


def test_config_flattens_to_dotted_keys_with_plain_values():
    cfg = FitConfig()
    cfg.model.kwargs = {"depth": 2}
    flat = flatten_config(config_to_dict(cfg))
    assert flat["model.kwargs"] == {"depth": 2} and flat["out_dir"] == "runs/lorafair" and flat["lora.r"] == 16


def test_mean_of_no_values_is_nan():
    assert mean([0.25, 0.5, 1.5]) == 0.75 and math.isnan(mean([]))


def test_accuracy_table_shows_percentages_and_the_mean():
    table = accuracy_table({"clipart": 0.5, "sketch": 0.25}, 0.375, "title")
    assert table.splitlines() == ["title", "domain   top-1 %", "-------  -------", "clipart    50.00",
                                  "sketch     25.00", "mean       37.50"]


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "taken").write_text("x")
    return tmp_path / "taken"


@pytest.mark.parametrize("where", ["an existing file", "inside a file", "read-only parent"])
def test_an_unusable_out_dir_is_one_line_before_training(tmp_path, capsys, where):
    if where == "read-only parent":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "locked").mkdir(mode=0o500)
        out_dir = tmp_path / "locked" / "run"
    else:
        out_dir = _a_file(tmp_path) if where == "an existing file" else _a_file(tmp_path) / "run"
    assert main(["fit", *tiny_args(out_dir)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"out_dir: cannot write the run folder {out_dir}" in err
    assert "Initializing" not in capsys.readouterr().out


def test_the_results_check_accepts_what_fit_writes(tiny_run):
    out_dir, results = tiny_run
    assert results_problem(json.loads((out_dir / "results.json").read_text())) is None
    assert results_problem({**results, "final": None}) is None  # a run not finished yet
