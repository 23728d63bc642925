"""`lorafair report`: tables and plots rebuilt from synthetic run folders; a bad results file is one line naming it."""

from __future__ import annotations

import csv
import io
import json
import random
import statistics
from pathlib import Path

import pytest
from PIL import Image

from lorafair.aggregation import display_name
from lorafair.cli import main
from lorafair.errors import UserError
from lorafair.federated.run_folder import read_results
from lorafair.reporting.report import report
from tests.helpers import (
    BAD_RESULTS,
    REPORT_DOMAINS,
    REPORT_ROUNDS,
    REPORT_SEEDS,
    markdown_rows,
    one_error_line,
    write_run,
)


def expected_cell(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values)


@pytest.fixture
def comparison(tmp_path: Path) -> tuple[Path, dict[tuple[str, int], dict[str, float]]]:
    """flora, fedit, lorafair (written in that order) with two seeds each."""
    finals = {}
    for method in ["flora", "lorafair", "fedit"]:
        for seed in REPORT_SEEDS:
            finals[method, seed] = write_run(tmp_path / method / f"seed{seed}", method, seed,
                                             bytes_down=12000 if method == "flora" else 4000)
    return tmp_path, finals


def test_table_has_every_method_and_domain_with_mean_std_and_best_in_bold(comparison) -> None:
    directory, finals = comparison
    report(directory)
    header, rows = markdown_rows((directory / "comparison.md").read_text(), "## Top-1 accuracy (%)")
    assert header == ["Method", *REPORT_DOMAINS, "Average"]
    methods = ["fedit", "flora", "lorafair"]  # canonical order, not the order the folders were written in
    assert [row[0] for row in rows] == [display_name(m) for m in methods]
    for column, domain in enumerate([*REPORT_DOMAINS, "Average"], start=1):
        means = {}
        for method, row in zip(methods, rows, strict=True):
            per_seed = [100 * (statistics.fmean(finals[method, s].values()) if domain == "Average"
                               else finals[method, s][domain]) for s in REPORT_SEEDS]
            mean, std = expected_cell(per_seed)
            means[method] = round(mean, 2)
            assert row[column].strip("*") == f"{mean:.2f} ± {std:.2f}"
        best = max(means.values())
        for method, row in zip(methods, rows, strict=True):
            assert row[column].startswith("**") == (means[method] == best)


def test_csv_holds_the_numbers_of_the_markdown_table(comparison) -> None:
    directory, _ = comparison
    report(directory)
    text = (directory / "comparison.md").read_text()
    header, md_rows = markdown_rows(text, "## Top-1 accuracy (%)")
    csv_rows = list(csv.DictReader(io.StringIO((directory / "comparison.csv").read_text())))
    assert [row["name"] for row in csv_rows] == [row[0] for row in md_rows]
    for csv_row, md_row in zip(csv_rows, md_rows, strict=True):
        assert csv_row["seeds"] == "0 1"
        for column, name in enumerate(header[1:], start=1):
            key = name.lower()
            assert md_row[column].strip("*") == f"{csv_row[f'{key}_mean']} ± {csv_row[f'{key}_std']}"
    by_method = {row["method"]: row for row in csv_rows}
    assert by_method["flora"]["bytes_down"] == "12000" and by_method["fedit"]["bytes_down"] == "4000"
    _, comm_rows = markdown_rows(text, "## Communication per client per round")
    assert [row[1:] for row in comm_rows] == [["4.00 kB", "4.00 kB"], ["4.00 kB", "12.00 kB"], ["4.00 kB", "4.00 kB"]]


def test_language_model_runs_get_an_eval_loss_table_with_the_lowest_in_bold(tmp_path, comparison) -> None:
    image_directory, _ = comparison
    report(image_directory)
    assert "Eval loss" not in (image_directory / "comparison.md").read_text()
    assert "eval_loss" not in (image_directory / "comparison.csv").read_text()
    methods = ["fedit", "lorafair"]
    losses = {(method, seed): write_run(tmp_path / "text" / method / f"seed{seed}", method, seed, eval_loss=True)
              for method in methods for seed in REPORT_SEEDS}
    report(tmp_path / "text")
    header, rows = markdown_rows((tmp_path / "text" / "comparison.md").read_text(), "## Eval loss")
    assert header == ["Method", *REPORT_DOMAINS, "Average"]
    csv_rows = {row["method"]: row for row in csv.DictReader(io.StringIO((tmp_path / "text" / "comparison.csv")
                                                                          .read_text()))}
    for column, domain in enumerate([*REPORT_DOMAINS, "Average"], start=1):
        means = {}
        for method, row in zip(methods, rows, strict=True):
            per_seed = [statistics.fmean(losses[method, s].values()) if domain == "Average"
                        else losses[method, s][domain] for s in REPORT_SEEDS]
            mean, std = expected_cell(per_seed)
            means[method] = round(mean, 2)
            assert row[column].strip("*") == f"{mean:.2f} ± {std:.2f}"
            assert float(csv_rows[method][f"{domain.lower()}_eval_loss_mean"]) == pytest.approx(mean, abs=1e-4)
        for method, row in zip(methods, rows, strict=True):
            assert row[column].startswith("**") == (means[method] == min(means.values()))


def test_aggregation_metrics_are_averaged_over_rounds_then_seeds(comparison) -> None:
    directory, _ = comparison
    report(directory)
    header, rows = markdown_rows((directory / "comparison.md").read_text(), "## Server aggregation metrics")
    assert header == ["Method", "cos_avg_mean", "cos_factor_mean"]
    for method, row in zip(["fedit", "flora", "lorafair"], rows, strict=True):
        assert row[0] == display_name(method)
        for column, name in enumerate(header[1:], start=1):
            per_seed = []
            for seed in REPORT_SEEDS:
                rounds = json.loads((directory / method / f"seed{seed}" / "results.json").read_text())["rounds"]
                values = [r["aggregation"][name] for r in rounds if name in r["aggregation"]]
                if values:
                    per_seed.append(sum(values) / len(values))
            assert row[column] == (f"{sum(per_seed) / len(per_seed):.6f}" if per_seed else "-")
    assert rows[2][2] != "-" and rows[0][2] == "-"  # only LoRA-FAIR logs cos_factor


def test_runs_without_round_details_report_zero_bytes_and_no_metrics(tmp_path) -> None:
    """Results files that hold the final accuracies but no per-round records (or records without metrics)."""
    for method, rounds in (("fedit", []), ("lorafair", [{"round": 1, "bytes_up": 10, "bytes_down": 30}])):
        folder = tmp_path / method / "seed0"
        folder.mkdir(parents=True)
        final = {"accuracy": {"a": 0.5}, "mean_accuracy": 0.5}
        (folder / "results.json").write_text(json.dumps({"method": method, "seed": 0, "rounds": rounds,
                                                         "config": {"seed": 0}, "final": final}))
    report(tmp_path)
    text = (tmp_path / "comparison.md").read_text()
    _, rows = markdown_rows(text, "## Communication per client per round")
    assert rows == [["FedIT", "0 B", "0 B"], ["LoRA-FAIR", "10 B", "30 B"]]
    assert "## Server aggregation metrics" not in text


def test_plots_are_png_and_a_rerun_writes_the_same_bytes(comparison) -> None:
    directory, _ = comparison
    names = ["comparison.md", "comparison.csv", "accuracy_vs_round.png", "communication.png"]
    report(directory)
    first = {name: (directory / name).read_bytes() for name in names}
    for name in names[2:]:
        with Image.open(directory / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100
    report(directory)
    assert {name: (directory / name).read_bytes() for name in names} == first


def test_unfinished_runs_are_named_and_left_out(comparison, capsys) -> None:
    directory, _ = comparison
    write_run(directory / "flexlora" / "seed0", "flexlora", 0, finished=False)
    (directory / "florana" / "seed0").mkdir(parents=True)
    (directory / "florana" / "seed0" / "config.yaml").write_text("seed: 0\n")
    write_run(directory / "fedit" / "seed2", "fedit", 2)
    (directory / "fedit" / "seed2" / "final").mkdir()  # the run's export, with a config.yaml of its own
    (directory / "fedit" / "seed2" / "final" / "config.yaml").write_text("seed: 2\n")
    trainer_layout = directory / "ffa_lora" / "seed0"  # final is null until the last round; config in config.yaml
    trainer_layout.mkdir(parents=True)
    (trainer_layout / "config.yaml").write_text("seed: 0\nserver:\n  method: ffa_lora\n  lam: 0.01\n")
    (trainer_layout / "results.json").write_text(json.dumps({"method": "ffa_lora", "rounds": [], "final": None}))
    report(directory)
    text = (directory / "comparison.md").read_text()
    _, rows = markdown_rows(text, "## Top-1 accuracy (%)")
    assert "FlexLoRA" not in [row[0] for row in rows] and "FLoRA-NA" not in [row[0] for row in rows]
    assert "flexlora/seed0: 3 of 3 rounds, not finished" in text
    assert "florana/seed0: started, no round finished" in text and "fedit/seed2/final" not in text
    assert "ffa_lora/seed0: 0 of ? rounds, not finished" in text
    assert "Missing: FLoRA has no finished run for seed 2." in text
    assert "flexlora/seed0" in capsys.readouterr().err


def test_a_sweep_gets_one_row_per_value_and_an_accuracy_vs_value_plot(tmp_path: Path) -> None:
    for lam in [0.1, 0.0, 0.01]:
        for method in ["lorafair", "fedit"]:
            for seed in REPORT_SEEDS:
                write_run(tmp_path / f"{method}-server.lam={lam}" / f"seed{seed}", method, seed, lam=lam)
    report(tmp_path)
    header, rows = markdown_rows((tmp_path / "comparison.md").read_text(), "## Top-1 accuracy (%)")
    assert header[:2] == ["Method", "server.lam"]
    assert [row[:2] for row in rows] == [["FedIT", "0.0"], ["FedIT", "0.01"], ["FedIT", "0.1"],
                                         ["LoRA-FAIR", "0.0"], ["LoRA-FAIR", "0.01"], ["LoRA-FAIR", "0.1"]]
    with Image.open(tmp_path / "accuracy_vs_server.lam.png") as image:
        assert image.format == "PNG"


def test_runs_recorded_before_a_method_option_existed_share_the_setting_of_runs_at_its_default(tmp_path) -> None:
    """FedIT's runs record no init_batches (written before Fed-SB added it); Fed-SB's record the default 4: one row
    each, no setting column. A Fed-SB run at 8 is a setting of its own."""
    for method, batches in (("fedit", None), ("fed_sb", 4)):
        for seed in REPORT_SEEDS:
            write_run(tmp_path / method / f"seed{seed}", method, seed)
            if batches is not None:
                path = tmp_path / method / f"seed{seed}" / "results.json"
                results = json.loads(path.read_text())
                results["config"]["server"]["init_batches"] = batches
                path.write_text(json.dumps(results))
    report(tmp_path)
    header, rows = markdown_rows((tmp_path / "comparison.md").read_text(), "## Top-1 accuracy (%)")
    assert header[1] == REPORT_DOMAINS[0] and [row[0] for row in rows] == ["FedIT", "Fed-SB"]

    write_run(tmp_path / "fed_sb-8" / "seed0", "fed_sb", 0)
    path = tmp_path / "fed_sb-8" / "seed0" / "results.json"
    results = json.loads(path.read_text())
    results["config"]["server"]["init_batches"] = 8
    path.write_text(json.dumps(results))
    report(tmp_path)
    header, rows = markdown_rows((tmp_path / "comparison.md").read_text(), "## Top-1 accuracy (%)")
    assert header[:2] == ["Method", "server.init_batches"]
    assert [row[:2] for row in rows] == [["FedIT", "4"], ["Fed-SB", "4"], ["Fed-SB", "8"]]


def test_no_finished_run_is_a_user_error(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "fedit" / "seed0", "fedit", 0, finished=False)
    with pytest.raises(UserError, match="no finished run"):
        report(tmp_path)
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_round_records_of_earlier_versions_name_the_processes_ranks(tmp_path) -> None:
    """Earlier versions called the process that trained each client `ranks` in results.json; report reads such
    runs beside this version's, and read_results gives their records as `processes`."""
    for method, key in (("fedit", "ranks"), ("lorafair", "processes")):
        write_run(tmp_path / method / "seed0", method, 0)
        path = tmp_path / method / "seed0" / "results.json"
        results = json.loads(path.read_text())
        for record in results["rounds"]:
            record[key] = {"0": 0, "1": 1}
        path.write_text(json.dumps(results))
    report(tmp_path)
    _, rows = markdown_rows((tmp_path / "comparison.md").read_text(), "## Top-1 accuracy (%)")
    assert [row[0] for row in rows] == [display_name("fedit"), display_name("lorafair")]
    for method in ("fedit", "lorafair"):
        records = read_results(tmp_path / method / "seed0" / "results.json")["rounds"]
        assert all(record["processes"] == {"0": 0, "1": 1} and "ranks" not in record for record in records)


@pytest.mark.parametrize(("data_name", "metric"), [("arithmetic", "Exact match"), ("instruction", "Exact match"),
                                                   ("text_classification", "Top-1 accuracy"),
                                                   ("shapes", "Top-1 accuracy")])
def test_the_tables_name_the_metric_of_the_task(tmp_path, data_name, metric) -> None:
    """Generated answers are scored by exact match, classes by top-1 accuracy: the table says which."""
    for method in ("fedit", "lorafair"):
        write_run(tmp_path / method / "seed0", method, 0)
        path = tmp_path / method / "seed0" / "results.json"
        results = json.loads(path.read_text())
        results["config"]["data"] = {"name": data_name}
        path.write_text(json.dumps(results))
    report(tmp_path)
    text = (tmp_path / "comparison.md").read_text()
    other = {"Exact match": "Top-1 accuracy", "Top-1 accuracy": "Exact match"}[metric]
    assert f"## {metric} (%)" in text and f"\n{metric} of the global model on each domain's test split" in text
    assert other not in text and other.lower() not in text
    _, rows = markdown_rows(text, f"## {metric} (%)")
    assert [row[0] for row in rows] == [display_name("fedit"), display_name("lorafair")]


def test_runs_that_score_each_clients_own_model_get_a_personalised_table_beside_the_global_one(comparison) -> None:
    """FedSA-LoRA's runs hold a personalised block: its table has FedSA-LoRA and the local bound (whose final
    scores are its clients' own models), not the methods without one; the global table keeps every method."""
    directory, _ = comparison
    own = {}
    for method in ("fedsa_lora", "local"):
        for seed in REPORT_SEEDS:
            folder = directory / method / f"seed{seed}"
            final = write_run(folder, method, seed)
            results = json.loads((folder / "results.json").read_text())
            if method == "fedsa_lora":
                rng = random.Random(f"own-{seed}")
                accuracy = {domain: rng.uniform(0.2, 0.9) for domain in REPORT_DOMAINS}
                results["personalised"] = {"round": REPORT_ROUNDS, "accuracy": accuracy,
                                           "mean_accuracy": statistics.fmean(accuracy.values())}
                (folder / "results.json").write_text(json.dumps(results))
                final = accuracy
            own[method, seed] = final
    report(directory)
    text = (directory / "comparison.md").read_text()
    _, rows = markdown_rows(text, "## Top-1 accuracy (%)")
    assert [row[0] for row in rows] == ["FedIT", "FLoRA", "LoRA-FAIR", "FedSA-LoRA", "Local (bound)"]
    header, rows = markdown_rows(text, "## Personalised top-1 accuracy (%)")
    assert header == ["Method", *REPORT_DOMAINS, "Average"]
    assert [row[0] for row in rows] == ["FedSA-LoRA", "Local (bound)"]
    for method, row in zip(("fedsa_lora", "local"), rows, strict=True):
        for column, domain in enumerate([*REPORT_DOMAINS, "Average"], start=1):
            per_seed = [100 * (statistics.fmean(own[method, s].values()) if domain == "Average"
                               else own[method, s][domain]) for s in REPORT_SEEDS]
            mean, std = expected_cell(per_seed)
            assert row[column] == (f"**{mean:.2f} ± {std:.2f}**" if method == "fedsa_lora" else
                                   f"{mean:.2f} ± {std:.2f}")  # one method: the best; the bound is never bold


def test_no_personalised_table_without_personalised_scores(comparison) -> None:
    directory, _ = comparison
    report(directory)
    assert "Personalised" not in (directory / "comparison.md").read_text()


@pytest.mark.parametrize("case", list(BAD_RESULTS))
def test_report_stops_at_a_bad_results_file_naming_it(tmp_path, capsys, case):
    content, expected = BAD_RESULTS[case]
    write_run(tmp_path / "fedit" / "seed0", "fedit", 0)
    bad = tmp_path / "lorafair" / "seed0" / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(content)
    assert main(["report", str(tmp_path)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"results file {bad}" in err and expected in err
    assert not (tmp_path / "comparison.md").exists()


def test_report_of_a_run_folder_without_results_is_one_line(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    assert main(["report", str(tmp_path)]) == 2
    assert f"no finished run under {tmp_path}" in one_error_line(capsys.readouterr().err)
