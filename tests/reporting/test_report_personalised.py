"""The personalised scores in comparison.csv and in the accuracy-vs-round plot, checked against values computed here
from the synthetic results files."""

from __future__ import annotations

import csv
import io
import json
import random
import statistics
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from lorafair.reporting import report as report_module
from lorafair.reporting.report import report

DOMAINS = ["clipart", "sketch"]
SEEDS = [0, 1, 2]
ROUNDS = 3
METHODS = ["fedit", "fedsa_lora", "local"]


def scores(rng: random.Random) -> dict:
    accuracy = {domain: rng.uniform(0.2, 0.9) for domain in DOMAINS}
    return {"accuracy": accuracy, "mean_accuracy": statistics.fmean(accuracy.values())}


def write_run(folder: Path, method: str, seed: int) -> dict:
    """A finished results.json as `lorafair fit` writes it, every round evaluated; FedSA-LoRA's rounds and final
    also score each client's own model (`personalised`). Returns the results."""
    rng = random.Random(f"{method}-{seed}")
    rounds = []
    for t in range(1, ROUNDS + 1):
        entry = {"round": t, "bytes_up": 100, "bytes_down": 100, "seconds": {"train": 1.0}, **scores(rng)}
        if method == "fedsa_lora":
            entry["personalised"] = {"round": t, **scores(rng)}
        rounds.append(entry)
    results = {"method": method, "seed": seed, "rounds": rounds, "start": {"round": 0, **scores(rng)},
               "final": {key: rounds[-1][key] for key in ("round", "accuracy", "mean_accuracy")},
               "config": {"seed": seed, "out_dir": str(folder), "server": {"method": method}, "lora": {"r": 8}}}
    if method == "fedsa_lora":
        results["personalised"] = rounds[-1]["personalised"]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return results


@pytest.fixture
def runs(tmp_path: Path) -> dict[tuple[str, int], dict]:
    return {(method, seed): write_run(tmp_path / method / f"seed{seed}", method, seed)
            for method in METHODS for seed in SEEDS}


def own_scores(results: dict) -> dict:
    """Each client's own model's final scores as the Personalised table takes them: the local bound's final ones."""
    return results["final"] if results["method"] == "local" else results["personalised"]


def test_csv_has_the_personalised_columns_for_the_methods_that_have_them(runs, tmp_path) -> None:
    report(tmp_path)
    rows = {row["method"]: row for row in csv.DictReader(io.StringIO((tmp_path / "comparison.csv").read_text()))}
    for method in METHODS:
        for column in [*DOMAINS, "average"]:
            cells = rows[method][f"{column}_personalised_mean"], rows[method][f"{column}_personalised_std"]
            if method == "fedit":
                assert cells == ("", ""), column
                continue
            per_seed = [100 * (own_scores(runs[method, seed])["mean_accuracy"] if column == "average"
                               else own_scores(runs[method, seed])["accuracy"][column]) for seed in SEEDS]
            assert cells == (f"{statistics.fmean(per_seed):.2f}", f"{statistics.stdev(per_seed):.2f}"), column
    # the global columns are the runs' final scores, unchanged
    per_seed = [100 * runs["fedsa_lora", seed]["final"]["mean_accuracy"] for seed in SEEDS]
    assert rows["fedsa_lora"]["average_mean"] == f"{statistics.fmean(per_seed):.2f}"


def test_csv_without_personalised_scores_has_no_personalised_columns(tmp_path) -> None:
    for seed in SEEDS:
        write_run(tmp_path / "fedit" / f"seed{seed}", "fedit", seed)
    report(tmp_path)
    assert "personalised" not in (tmp_path / "comparison.csv").read_text()


def test_the_plot_draws_the_personalised_average_dotted_in_the_methods_colour(runs, tmp_path, monkeypatch) -> None:
    """The figure of accuracy_vs_round.png: FedSA-LoRA's global and personalised averages per round (round 0: the
    starting model), both in one colour, the personalised one dotted; no personalised line for the others."""
    figures: dict[str, Figure] = {}
    save = report_module._save
    monkeypatch.setattr(report_module, "_save", lambda fig, path: (figures.update({path.name: fig}), save(fig, path)))
    report(tmp_path)
    lines = {line.get_label(): line for line in figures["accuracy_vs_round.png"].axes[0].get_lines()}
    assert set(lines) == {"FedIT", "FedSA-LoRA", "FedSA-LoRA, personalised", "Local (bound)"}
    own, shared = lines["FedSA-LoRA, personalised"], lines["FedSA-LoRA"]
    assert own.get_linestyle() == ":" and shared.get_linestyle() == "-" and own.get_color() == shared.get_color()
    results = [runs["fedsa_lora", seed] for seed in SEEDS]
    expected = [statistics.fmean(100 * r["start"]["mean_accuracy"] for r in results)]
    expected += [statistics.fmean(100 * r["rounds"][t - 1]["personalised"]["mean_accuracy"] for r in results)
                 for t in range(1, ROUNDS + 1)]
    assert list(own.get_xdata()) == list(range(ROUNDS + 1))
    assert list(own.get_ydata()) == pytest.approx(expected, abs=1e-9)
    assert list(shared.get_ydata())[1:] == pytest.approx(
        [statistics.fmean(100 * r["rounds"][t - 1]["mean_accuracy"] for r in results) for t in range(1, ROUNDS + 1)],
        abs=1e-9)
