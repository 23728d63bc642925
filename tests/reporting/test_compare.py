"""`lorafair compare`: run planning, resuming an interrupted comparison, the paper configs, one real tiny compare, a
bad results file left out."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from pathlib import Path

import pytest

from lorafair.aggregation import display_name, registered_methods
from lorafair.cli import main, parse
from lorafair.config import ConfigError, DataConfig, FitConfig
from lorafair.errors import UserError
from lorafair.federated.run_folder import run_status
from lorafair.reporting.compare import compare, grid_keys, parse_grid, plan_runs
from lorafair.reporting.report import report
from tests.helpers import BAD_RESULTS, ROOT, FakeTrainer, markdown_rows, one_error_line, tiny_args, tiny_config

PAPER_CONFIGS = ROOT / "configs" / "paper"


def base_config(out_dir: Path) -> FitConfig:
    return FitConfig(data=DataConfig(name="digits"), out_dir=out_dir)


def test_a_sweep_plans_one_run_per_method_seed_and_value(tmp_path: Path) -> None:
    cfg = base_config(tmp_path)
    runs = plan_runs(cfg, ["lorafair", "fedit"], [0, 1], "lora.r=4,8,16")
    assert len(runs) == 2 * 2 * 3
    assert len({run.cfg.out_dir for run in runs}) == len(runs)
    assert [run.seed for run in runs[:6]] == [0] * 6  # seed by seed: a full table after the first seed
    for run in runs:
        key, value = run.override
        assert key == "lora.r" and isinstance(value, int)
        assert run.cfg.out_dir == tmp_path / f"{run.method}-lora.r={value}" / f"seed{run.seed}"
        assert (run.cfg.server.method, run.cfg.seed, run.cfg.lora.r) == (run.method, run.seed, value)
        reset = dataclasses.replace(run.cfg, seed=cfg.seed, out_dir=cfg.out_dir, resume=cfg.resume,
                                    server=dataclasses.replace(run.cfg.server, method=cfg.server.method),
                                    lora=dataclasses.replace(run.cfg.lora, r=cfg.lora.r))
        assert reset == cfg  # everything else identical
    assert {(run.method, run.seed, run.override[1]) for run in runs} == {
        (method, seed, r) for method in ("lorafair", "fedit") for seed in (0, 1) for r in (4, 8, 16)}


def test_without_grid_or_seeds_each_method_runs_once_with_the_config_seed(tmp_path: Path) -> None:
    cfg = dataclasses.replace(base_config(tmp_path), seed=7)
    runs = plan_runs(cfg, ["flora", "flora", "ffa_lora"], None, None)
    assert [(run.method, run.seed, run.override, run.cfg.out_dir) for run in runs] == [
        ("flora", 7, None, tmp_path / "flora" / "seed7"), ("ffa_lora", 7, None, tmp_path / "ffa_lora" / "seed7")]


def test_grid_values_are_parsed_with_the_field_type() -> None:
    assert parse_grid("server.lam=0, 1e-3,0.01,0.010") == ("server.lam", [0.0, 0.001, 0.01])
    assert parse_grid("server.residual_on=A,B") == ("server.residual_on", ["A", "B"])
    assert parse_grid("federation.clients_per_round=null,3") == ("federation.clients_per_round", [None, 3])
    assert "data.domains" not in grid_keys() and "server.method" not in grid_keys()


@pytest.mark.parametrize(("methods", "grid", "error", "message"), [
    (["fedit", "fedavg"], None, UserError, "unknown method fedavg; valid: " + ", ".join(registered_methods())),
    (["fedit"], "server.lamda=0,1", UserError, "KEY one of .*server.lam, server.lower_ranks, server.lr"),
    (["fedit"], "lora.r=4,4.5", UserError, "lora.r='4.5' is not valid, expected int"),
    (["fedit"], "server.residual_on=A,C", UserError, "expected one of A, B"),
    (["fedit"], "server.method=fedit", UserError, "use --methods"),
    (["fedit"], "lora.r=0,4", ConfigError, "lora.r: must be a positive integer"),
])
def test_bad_methods_and_grids_are_user_errors(tmp_path: Path, methods, grid, error, message) -> None:
    with pytest.raises(error, match=message):
        plan_runs(base_config(tmp_path), methods, None, grid)


def test_compare_refuses_overwrite_rather_than_delete_finished_runs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="overwrite: compare keeps finished runs"):
        plan_runs(dataclasses.replace(base_config(tmp_path), overwrite=True), ["fedit"], None, None)


def test_run_status_reads_the_folder(tmp_path: Path) -> None:
    assert run_status(tmp_path / "absent") == "new"
    (tmp_path / "checkpoints").mkdir()
    assert run_status(tmp_path) == "new"
    (tmp_path / "checkpoints" / "round_2.pt").write_bytes(b"x")
    (tmp_path / "results.json").write_text(json.dumps({"rounds": [{}, {}], "final": None}))
    assert run_status(tmp_path) == "resume"
    (tmp_path / "results.json").write_text(json.dumps({"rounds": [{}], "final": {"accuracy": {"a": 0.5},
                                                                                  "mean_accuracy": 0.5}}))
    assert run_status(tmp_path) == "done"
    (tmp_path / "results.json").write_text("[]")
    assert run_status(tmp_path) == "unreadable"


def use_trainer(monkeypatch, trainer: FakeTrainer) -> None:
    monkeypatch.setitem(sys.modules, "lorafair.fit", types.SimpleNamespace(fit=trainer.fit))


def test_an_interrupted_compare_keeps_finished_runs_and_resumes_the_partial_one(tmp_path, monkeypatch, capsys) -> None:
    cfg = base_config(tmp_path)
    methods, seeds = ["fedit", "lorafair", "flora"], [0, 1]
    crashing = FakeTrainer(crash_on_call=3)
    use_trainer(monkeypatch, crashing)
    with pytest.raises(KeyboardInterrupt):
        compare(cfg, methods, seeds, None)
    assert not (tmp_path / "comparison.md").exists()

    trainer = FakeTrainer()
    use_trainer(monkeypatch, trainer)
    compare(cfg, methods, seeds, None)
    called = [(c.server.method, c.seed, c.resume) for c in trainer.calls]
    assert called == [("flora", 0, "auto"), ("fedit", 1, None), ("lorafair", 1, None), ("flora", 1, None)]
    table = (tmp_path / "comparison.md").read_text()
    assert all(name in table for name in ("| FedIT |", "| LoRA-FAIR |", "| FLoRA |"))

    written = {name: (tmp_path / name).read_bytes() for name in ("comparison.md", "comparison.csv")}
    report(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in written} == written

    again = FakeTrainer()
    use_trainer(monkeypatch, again)
    capsys.readouterr()
    compare(dataclasses.replace(cfg, client=dataclasses.replace(cfg.client, lr=0.02)), methods, seeds, None)
    assert again.calls == []
    assert "finished with another config (client.lr: 0.01 -> 0.02)" in capsys.readouterr().err


def test_a_sweep_of_a_server_option_notes_the_methods_that_ignore_it(tmp_path, monkeypatch, capsys) -> None:
    trainer = FakeTrainer()
    use_trainer(monkeypatch, trainer)
    compare(base_config(tmp_path), ["fedit", "lorafair"], [0], "server.lam=0,0.01")
    assert len(trainer.calls) == 4
    err = capsys.readouterr().err
    assert "fedit ignores server.lam" in err and "lorafair ignores" not in err
    assert (tmp_path / "accuracy_vs_server.lam.png").is_file()


def test_under_torchrun_every_run_goes_to_fit_and_only_rank_zero_writes_the_report(tmp_path, monkeypatch) -> None:
    cfg = base_config(tmp_path)
    use_trainer(monkeypatch, FakeTrainer())
    compare(cfg, ["fedit"], [0], None)  # finished before the torchrun job below
    (tmp_path / "comparison.md").unlink()

    trainer = FakeTrainer()
    use_trainer(monkeypatch, trainer)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    compare(cfg, ["fedit", "lorafair"], [0, 1], None)
    # ranks may not share a disk: none skips by what it sees, the trainer's rank 0 resumes (or finds it finished)
    assert [(c.server.method, c.seed, c.resume) for c in trainer.calls] == [
        ("fedit", 0, "auto"), ("lorafair", 0, "auto"), ("fedit", 1, "auto"), ("lorafair", 1, "auto")]
    assert not (tmp_path / "comparison.md").exists()


def test_every_paper_config_parses_and_plans_its_runs() -> None:
    names = sorted(path.name for path in PAPER_CONFIGS.glob("*.yaml"))
    tables = [f"table{t}_{m}_{d}.yaml" for t in (1, 2) for m in ("vit", "mixer") for d in ("domainnet", "nicopp")]
    assert set(tables) | {"table3_residual.yaml", "figure6_lam.yaml", "figure7_rank.yaml"} == set(names)
    for name in names:
        _, args = parse(["compare", "--config", str(PAPER_CONFIGS / name)])
        cfg = args["cfg"]
        methods = args["methods"].split(",")
        runs = plan_runs(cfg, methods, args["seeds"], args["grid"])
        grid_points = len(parse_grid(args["grid"])[1]) if args["grid"] else 1
        assert len(runs) == len(methods) * 3 * grid_points, name
        assert cfg.out_dir == Path("runs/paper") / name.removesuffix(".yaml")
        assert cfg.federation.rounds == (50 if cfg.data.name == "domainnet" else 30), name
        label_skew = name.startswith("table2")
        assert cfg.federation.partition == ("feature_label" if label_skew else "feature"), name
        assert cfg.federation.clients_per_round == (18 if label_skew else None), name
        assert cfg.client.local_epochs == (5 if label_skew else 2), name
        assert (cfg.client.lr, cfg.data.batch_size, cfg.server.lam) == (0.01, 128, 0.01), name


def test_a_tiny_compare_through_the_cli_writes_tables_and_plots(tmp_path: Path) -> None:
    args = ["compare", "--methods", "fedit,lorafair", *tiny_args(tmp_path)]
    assert main(args) == 0
    table = (tmp_path / "comparison.md").read_text()
    results = {method: json.loads((tmp_path / method / "seed0" / "results.json").read_text())
               for method in ("fedit", "lorafair")}
    header, rows = markdown_rows(table, "## Top-1 accuracy (%)")
    for method, row in zip(results, rows, strict=True):  # one seed: each cell is the run's final accuracy
        final = results[method]["final"]
        start = results[method]["start"]["mean_accuracy"]
        expected = [100 * final["accuracy"][domain] for domain in header[1:-3]] + [
            100 * final["mean_accuracy"], 100 * start, 100 * (final["mean_accuracy"] - start)]
        assert header[-3:] == ["Average", "Start", "Gain"]
        assert [display_name(method), *(f"{value:.2f}" for value in expected)] == [cell.strip("*") for cell in row]
    header, rows = markdown_rows(table, "## Server aggregation metrics")
    assert "cos_avg_mean" in header and "cos_factor_mean" in header
    for method, row in zip(results, rows, strict=True):
        for column, name in enumerate(header[1:], start=1):
            values = [r["aggregation"][name] for r in results[method]["rounds"] if name in r["aggregation"]]
            assert row[column] == (f"{sum(values) / len(values):.6f}" if values else "-")
    for name in ("comparison.csv", "accuracy_vs_round.png", "communication.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert sorted(p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("results.json")) == [
        "fedit/seed0", "lorafair/seed0"]
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "comparison.md").read_text() == table


def test_a_compare_without_exports_reports_the_same_and_its_runs_count_as_finished(tmp_path: Path, capsys) -> None:
    """--export false reaches every run (no final/ written) and changes nothing else: compare run again with the
    export on finds every run finished with the same config and rewrites the same report."""
    args = ["compare", "--methods", "fedit,lorafair", *tiny_args(tmp_path)]
    assert main([*args, "--export", "false"]) == 0
    for method in ("fedit", "lorafair"):
        run = tmp_path / method / "seed0"
        assert (run / "results.json").is_file() and any((run / "checkpoints").iterdir())
        assert not (run / "final").exists()
    table = (tmp_path / "comparison.md").read_text()
    assert "export" not in table
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "2 runs in" in out and "2 finished earlier" in out and "another config" not in err
    assert (tmp_path / "comparison.md").read_text() == table
    assert not any(tmp_path.rglob("final"))


def test_runs_in_parallel_equal_the_runs_fit_makes_here_and_log_their_output(tmp_path: Path) -> None:
    from lorafair.fit import fit

    methods = ["fedit", "lorafair", "ffa_lora"]
    args = ["compare", "--methods", ",".join(methods), "--jobs", "2", *tiny_args(tmp_path / "parallel"),
            "--cpu_threads", "1"]
    assert main(args) == 0
    for method in methods:  # each worker got its own run's config: the same run fitted here gives the same numbers
        here = fit(tiny_config(tmp_path / "here" / method, "--cpu_threads", "1", "--server.method", method))
        there = json.loads((tmp_path / "parallel" / method / "seed0" / "results.json").read_text())
        assert there["method"] == method
        assert there["final"]["accuracy"] == here["final"]["accuracy"]
        assert there["final"]["correct_items"] == here["final"]["correct_items"]
        log = (tmp_path / "parallel" / "logs" / f"{method}-seed0.log").read_text()
        assert "global model after round 2" in log
    assert "| FFA-LoRA |" in (tmp_path / "parallel" / "comparison.md").read_text()


def test_a_failed_parallel_run_stops_no_other_and_is_named_with_its_log(tmp_path: Path) -> None:
    foreign = tmp_path / "fedit" / "seed0"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("not lorafair's")  # fit refuses a folder holding what it did not write
    with pytest.raises(UserError, match=r"fedit/seed0: .*notes\.txt.*fedit-seed0\.log"):
        compare(tiny_config(tmp_path, "--cpu_threads", "1"), ["fedit", "lorafair"], [0], None, jobs=2)
    assert run_status(tmp_path / "lorafair" / "seed0") == "done"
    assert "notes.txt" in (tmp_path / "logs" / "fedit-seed0.log").read_text()


@pytest.mark.parametrize(("jobs", "world", "message"), [(0, "1", "pass 1 or more"), (2, "2", "under torchrun")])
def test_jobs_below_one_or_under_torchrun_are_refused(tmp_path, monkeypatch, jobs, world, message) -> None:
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(UserError, match=message):
        compare(base_config(tmp_path), ["fedit"], [0], None, jobs=jobs)


def test_the_runs_of_a_killed_parallel_compare_end_with_it(tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    command = [sys.executable, "-m", "lorafair", "compare", "--methods", "fedit,lorafair", "--jobs", "2",
               *tiny_args(tmp_path), "--federation.rounds", "200", "--cpu_threads", "1"]
    compare_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logs = [tmp_path / "logs" / f"{run}-seed0.log" for run in ("fedit", "lorafair")]
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    while time.monotonic() < deadline and not all(log.exists() for log in logs):  # both runs under way
        children = Path(f"/proc/{compare_process.pid}/task/{compare_process.pid}/children")
        workers |= {int(pid) for pid in children.read_text().split()} if children.exists() else set()
        time.sleep(0.1)
    assert workers and all(log.exists() for log in logs), "the compare started no runs"
    compare_process.send_signal(signal.SIGKILL)
    compare_process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.2)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and "spawn" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"worker processes {alive} outlived the killed compare"


def test_without_methods_a_mixed_rank_config_leaves_out_the_one_rank_methods(tmp_path, capsys) -> None:
    cfg = base_config(tmp_path)
    assert {run.method for run in plan_runs(cfg, None, None, None)} == {*registered_methods(), "centralized",
                                                                         "local"}
    mixed = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, client_ranks=[2, 4, 8]))
    planned = {run.method for run in plan_runs(mixed, None, None, None)}
    assert planned == {*registered_methods(), "centralized", "local"} - {"fedsa_lora", "rolora", "frlora",
                                                                                       "feddpa", "fed_sb"}
    assert "leaving out fedsa_lora, rolora, frlora, feddpa, fed_sb" in capsys.readouterr().err
    with pytest.raises(UserError):  # named, they are refused as fit refuses them
        plan_runs(mixed, ["fedit", "rolora"], None, None)


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
    err = one_error_line(captured.err)
    assert f"compare: left out of the report: results file {bad} is not valid JSON" in err
    assert bad.read_bytes() == BAD_RESULTS["truncated"][0]  # left as it was, not retrained over
    table = (tmp_path / "comparison.md").read_text()
    assert "| FedIT |" in table and "LoRA-FAIR |" not in table and str(bad) in table
