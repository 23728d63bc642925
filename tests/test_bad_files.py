"""Bad result files and unusable run folders: one line naming the file or folder, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import tiny_args, tiny_config
from test_compare import FakeTrainer
from test_report import write_run

from lorafair.cli import main
from lorafair.federated.run_folder import results_problem
from lorafair.reporting.compare import plan_runs

BAD_RESULTS = {
    "empty list": (b"[]", "holds [] instead of an object"),
    "null": (b"null", "holds null instead of an object"),
    "truncated": (b'{"method": "fedit", "rounds": [{"round": 1', "is not valid JSON"),
    "not utf-8": (b'{"method": "\xff\xfe"}', "is not UTF-8 text"),
    "no rounds": (b'{"method": "fedit", "final": null}', "'rounds' is missing"),
    "final without accuracy": (b'{"rounds": [], "final": {"mean_accuracy": 0.5}}', "'final' has no 'accuracy'"),
    "final without mean": (b'{"rounds": [], "final": {"accuracy": {"a": 0.5}}}', "no 'mean_accuracy'"),
}
"""Each case: (content of results.json, what the one line must say)."""


def _one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("lorafair: error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("case", list(BAD_RESULTS))
def test_report_stops_at_a_bad_results_file_naming_it(tmp_path, capsys, case):
    content, expected = BAD_RESULTS[case]
    write_run(tmp_path / "fedit" / "seed0", "fedit", 0)
    bad = tmp_path / "lorafair" / "seed0" / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(content)
    assert main(["report", str(tmp_path)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert f"results file {bad}" in err and expected in err
    assert not (tmp_path / "comparison.md").exists()


def test_report_of_a_run_folder_without_results_is_one_line(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    assert main(["report", str(tmp_path)]) == 2
    assert f"no finished run under {tmp_path}" in _one_error_line(capsys.readouterr().err)


def test_the_results_check_accepts_what_fit_writes(tiny_run):
    out_dir, results = tiny_run
    assert results_problem(json.loads((out_dir / "results.json").read_text())) is None
    assert results_problem({**results, "final": None}) is None  # a run not finished yet


def test_compare_skips_a_bad_results_file_reports_the_rest_and_exits_2(tmp_path, capsys):
    """fedit is finished, lorafair's results.json is truncated: compare trains nothing, reports fedit, names lorafair's
    file and exits 2."""
    args = ["compare", "--methods", "fedit,lorafair", *tiny_args(tmp_path), "--seed", "0"]
    fedit, lorafair = plan_runs(tiny_config(tmp_path), ["fedit", "lorafair"], [0], None)
    FakeTrainer().fit(fedit.cfg)  # finished with the planned config
    bad = lorafair.cfg.out_dir / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(BAD_RESULTS["truncated"][0])
    assert main(args) == 2
    captured = capsys.readouterr()
    err = _one_error_line(captured.err)
    assert f"compare: left out of the report: results file {bad} is not valid JSON" in err
    assert bad.read_bytes() == BAD_RESULTS["truncated"][0]  # left as it was, not retrained over
    table = (tmp_path / "comparison.md").read_text()
    assert "| FedIT |" in table and "LoRA-FAIR |" not in table and str(bad) in table


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
    err = _one_error_line(capsys.readouterr().err)
    assert f"out_dir: cannot write the run folder {out_dir}" in err
    assert "Initializing" not in capsys.readouterr().out
