"""Paper-style tables and plots from finished run folders: `lorafair report DIR`, also the last step of compare.

Everything is rebuilt from the `results.json` files under DIR, so a report written by `compare` and one written
later by `report` are the same bytes. A row is one method (and one value of every setting that differs between
runs, e.g. a swept `server.lam`); its cells are mean +- std over the row's seeds. The tables show the starting
model's score (round 0) and the gain, the bounds (centralized, local) apart from the methods, which differences
against a baseline method are significant (`lorafair.reporting.significance`) and, for methods whose clients keep
factors of their own, each client's own model beside the global one (the Personalised table).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.style
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lorafair.aggregation import display_name
from lorafair.config import BASELINE, BOUNDS, ServerConfig, comparable, metric_name
from lorafair.errors import UserError
from lorafair.federated.run_folder import (
    CONFIG_NAME,
    EXPORT_NAME,
    PER_RUN_KEYS,
    PERSONALISED,
    RESULTS_NAME,
    flatten_config,
    is_finished,
    read_results,
    run_config,
)
from lorafair.federated.state import decode_items
from lorafair.files import write_text_atomic
from lorafair.reporting.significance import BOOTSTRAP_SAMPLES, Interval, paired_bootstrap_interval, paired_t_interval

TABLE_NAME = "comparison.md"
CSV_NAME = "comparison.csv"
ROUNDS_PLOT_NAME = "accuracy_vs_round.png"
COMMUNICATION_PLOT_NAME = "communication.png"
PNG_METADATA = {"Software": None}
"""Leave matplotlib's version out of the PNGs so that reruns give the same bytes."""


@dataclass(frozen=True)
class Run:
    """One finished `lorafair fit` run, read from its results.json."""

    folder: str
    """Run folder relative to the report folder, with / separators."""
    method: str
    seed: int
    config: dict[str, Any]
    """Resolved config flattened to dotted keys (server.lam, lora.r, ...)."""
    rounds: list[dict]
    final: dict
    start: dict | None = None
    """The starting model's scores (round 0), where the run recorded them."""
    personalised: dict | None = None
    """Each client's own model's final scores on its own domain, where the run's clients keep factors of their own."""


@dataclass(frozen=True)
class Row:
    """The runs that differ only by seed: one line of the table."""

    method: str
    setting: tuple[tuple[str, Any], ...]
    """(key, value) of every config key that varies across the report's runs, e.g. (("server.lam", 0.01),)."""
    runs: tuple[Run, ...]

    @property
    def is_bound(self) -> bool:
        return self.method in BOUNDS

    @property
    def label(self) -> str:
        name = method_name(self.method)
        if not self.setting:
            return name
        return f"{name} ({', '.join(f'{key}={format_value(value)}' for key, value in self.setting)})"

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]


@dataclass(frozen=True)
class Stat:
    """Mean and sample std (None with one seed) of one table cell, in percent or bytes."""

    mean: float
    std: float | None

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)


def format_value(value: Any) -> str:
    """A config value as YAML writes it (null, true, 0.01); also names the folders of a sweep."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def _sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, json.dumps(value, sort_keys=True))


def _method_rank(method: str) -> int:
    """Position in the registration order, then the bounds (also picks the colour); unknown methods go last."""
    methods = comparable()
    return methods.index(method) if method in methods else len(methods)


def _colour(rank: int) -> tuple[float, ...]:
    """A line's colour by its rank: the ten strong hues of matplotlib's tab20 first, then their ten light ones, so
    that up to twenty rows (every method and both bounds) get colours of their own."""
    return matplotlib.colormaps["tab20"](2 * (rank % 10) + (rank // 10) % 2)


def method_name(method: str) -> str:
    """A method as the paper writes it; a bound marked as one."""
    return f"{method.capitalize()} (bound)" if method in BOUNDS else display_name(method)


def load_runs(directory: Path) -> tuple[list[Run], list[str], list[str]]:
    """Every complete run under `directory`, one line for each run that is not (yet) complete, and one line for
    each results.json that cannot be read as one (naming the file and the problem)."""
    runs, incomplete, bad = [], [], []
    results_files = sorted(directory.rglob(RESULTS_NAME))
    for path in results_files:
        folder = path.parent.relative_to(directory).as_posix()
        try:
            results = read_results(path)
        except UserError as err:
            bad.append(str(err))
            continue
        config = run_config(path.parent, results)
        if not is_finished(results):
            planned = config.get("federation", {}).get("rounds", "?")
            incomplete.append(f"{folder}: {len(results.get('rounds', []))} of {planned} rounds, not finished")
            continue
        method = results.get("method") or config.get("server", {}).get("method", "?")
        runs.append(Run(folder=folder, method=method, seed=int(results.get("seed", config.get("seed", 0))),
                        config=with_option_defaults(flatten_config(config)), rounds=results.get("rounds", []),
                        final=results["final"],
                        start=results.get("start"), personalised=results.get(PERSONALISED)))
    # a run's export (<run>/final/) holds a config.yaml too, but it is no run of its own
    started = ({path.parent for path in directory.rglob(CONFIG_NAME)} - {path.parent for path in results_files}
               - {path.parent / EXPORT_NAME for path in results_files})
    incomplete += [f"{folder.relative_to(directory).as_posix()}: started, no round finished" for folder in
                   sorted(started)]
    return runs, incomplete, bad


OPTION_DEFAULTS = {f"server.{option.name}": option.default for option in fields(ServerConfig)
                   if option.name != "method"}
"""Each method option's default: what a run recorded before the option existed ran with (options are added with
the method that uses them, and a method ignores the options of others)."""


def with_option_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A run's flattened config with the method options it does not record at their defaults, so that runs made
    before a method was added compare as the same setting as the runs made after."""
    return {**OPTION_DEFAULTS, **config}


def group_rows(runs: list[Run]) -> list[Row]:
    """Group runs into rows: same method and same value of every varying config key; canonical method order."""
    keys = sorted({key for run in runs for key in run.config} - PER_RUN_KEYS)
    varying = [key for key in keys
               if len({json.dumps(run.config.get(key), sort_keys=True) for run in runs}) > 1]
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        setting = tuple((key, run.config.get(key)) for key in varying)
        identity = (run.method, json.dumps(setting, sort_keys=True))
        groups.setdefault(identity, []).append(run)

    def order(group: list[Run]) -> tuple:
        method = group[0].method
        return (_method_rank(method), method, *(_sort_key(group[0].config.get(key)) for key in varying))

    return [Row(method=group[0].method, setting=tuple((key, group[0].config.get(key)) for key in varying),
                runs=tuple(sorted(group, key=lambda run: (run.seed, run.folder))))
            for group in sorted(groups.values(), key=order)]


def score_name(rows: list[Row]) -> str:
    """What the rows' scores measure, from each run's data.name (config.metric_name): top-1 accuracy for images and
    text classes, exact match for generated answers; both named where a report mixes them."""
    names = sorted({metric_name(str(run.config.get("data.name", ""))) for row in rows for run in row.runs})
    return " or ".join(names) if names else metric_name("")


def _domains(runs: Iterable[Run]) -> list[str]:
    domains: dict[str, None] = {}
    for run in runs:
        domains.update(dict.fromkeys(run.final.get("accuracy", {})))
    return list(domains)


def accuracy_stats(row: Row, domains: list[str]) -> dict[str, Stat | None]:
    """Final accuracy in percent per domain plus "Average", over the row's seeds (None where no run has it)."""
    return _final_stats(row, domains, "accuracy", 100)


def eval_loss_stats(row: Row, domains: list[str]) -> dict[str, Stat | None]:
    """Final eval loss per domain plus "Average", over the row's seeds (None where no run reports one)."""
    return _final_stats(row, domains, "eval_loss", 1)


def has_eval_loss(rows: list[Row]) -> bool:
    return any("eval_loss" in run.final for row in rows for run in row.runs)


def start_stats(row: Row, domains: list[str]) -> dict[str, Stat | None]:
    """The starting model's accuracy in percent per domain plus "Average" (None where no run scored it)."""
    return _entry_stats([run.start for run in row.runs if run.start is not None], domains, "accuracy", 100)


def gain_stats(row: Row, domains: list[str]) -> dict[str, Stat | None]:
    """Final minus starting accuracy in points per domain plus "Average", over the runs that scored both."""
    gains = [{"accuracy": {d: run.final["accuracy"][d] - run.start["accuracy"][d] for d in run.final["accuracy"]
                           if d in run.start["accuracy"]},
              "mean_accuracy": run.final["mean_accuracy"] - run.start["mean_accuracy"]}
             for run in row.runs if run.start is not None]
    return _entry_stats(gains, domains, "accuracy", 100)


def personalised_rows(rows: list[Row]) -> list[Row]:
    """The rows of the Personalised table: the methods whose runs scored each client's own model, and the local bound
    (whose clients only ever have their own), where some method has such scores; else none."""
    methods = [row for row in rows if any(run.personalised is not None for run in row.runs)]
    return [row for row in rows if row in methods or row.method == "local"] if methods else []


def personalised_stats(row: Row, domains: list[str]) -> dict[str, Stat | None]:
    """Each client's own model's final accuracy in percent per domain plus "Average" (the local bound's final
    scores are its clients' own models')."""
    entries = [run.final if row.method == "local" else run.personalised for run in row.runs]
    return _entry_stats([entry for entry in entries if entry is not None], domains, "accuracy", 100)


def _final_stats(row: Row, domains: list[str], key: str, scale: float) -> dict[str, Stat | None]:
    return _entry_stats([run.final for run in row.runs], domains, key, scale)


def _entry_stats(entries: list[dict], domains: list[str], key: str, scale: float) -> dict[str, Stat | None]:
    stats: dict[str, Stat | None] = {}
    for domain in domains:
        values = [scale * entry[key][domain] for entry in entries if domain in entry.get(key, {})]
        stats[domain] = Stat.of(values) if values else None
    means = [scale * entry[f"mean_{key}"] for entry in entries if f"mean_{key}" in entry]
    stats["Average"] = Stat.of(means) if means else None
    return stats


def difference(row: Row, baseline: Row) -> Interval | None:
    """Row minus baseline in average accuracy points, paired: Student t over the shared seeds (two or more), a
    bootstrap over the test items of the one shared seed, or None (no shared seed, or no item scores)."""
    base = {run.seed: run for run in baseline.runs}
    pairs = [(run, base[run.seed]) for run in row.runs if run.seed in base]
    if len(pairs) >= 2:
        return paired_t_interval([100 * (run.final["mean_accuracy"] - other.final["mean_accuracy"])
                                  for run, other in pairs])
    if len(pairs) == 1:
        run, other = pairs[0]
        items, other_items = run.final.get("correct_items"), other.final.get("correct_items")
        if not items or not other_items or items.keys() != other_items.keys():
            return None
        try:
            return paired_bootstrap_interval([(100 * _item_scores(items[d]), 100 * _item_scores(other_items[d]))
                                              for d in items])
        except ValueError:  # other test items (another data setting): no pairing
            return None
    return None


def _item_scores(encoded: list[str]) -> torch.Tensor:
    """A domain's item scores: the mean over the models scored on it (one, or a local bound's clients)."""
    return torch.stack([decode_items(text) for text in encoded]).mean(dim=0)


def baseline_row(rows: list[Row], row: Row, baseline: str) -> Row | None:
    """The baseline method's row with the same setting as `row` (None where there is none)."""
    return next((other for other in rows if other.method == baseline and other.setting == row.setting), None)


def _interval_cells(interval: Interval | None) -> list[str]:
    if interval is None:
        return ["-", "-", "-"]
    return [f"{interval.difference:+.2f}", f"[{interval.low:+.2f}, {interval.high:+.2f}]",
            "yes" if interval.excludes_zero else "no"]


def significance_lines(rows: list[Row], setting_keys: list[str], baseline: str) -> list[str]:
    """Markdown: every row against the baseline with its paired 95% interval, in words which differences are
    significant, and the best method against the weakest."""
    name = method_name(baseline)
    if not any(row.method == baseline for row in rows):
        return ["", f"## Differences against {name}", "",
                f"No run of the baseline {name} here: pass --baseline with a method of this report."]
    lines = ["", f"## Differences against {name} (paired, 95% interval)", "",
             *_table_head(setting_keys, [f"Average − {name} (points)", "95% interval", "Significant"],
                          aligns=["--:", "--:", ":-:"])]
    verdicts: dict[str, list[str]] = {"above": [], "below": [], "level": []}
    kinds = set()
    for row in rows:
        base = baseline_row(rows, row, baseline)
        if base is None or base is row:
            continue
        interval = difference(row, base)
        if interval is not None:
            kinds.add(interval.how)
            verdict = "level" if not interval.excludes_zero else "above" if interval.difference > 0 else "below"
            verdicts[verdict].append(row.label)
        lines.append(_table_row([method_name(row.method), *_setting_cells(row), *_interval_cells(interval)]))
    lines += ["", _interval_note(kinds),
              "", f"Significantly above {name}: {', '.join(verdicts['above']) or 'none'}. Significantly below: "
              f"{', '.join(verdicts['below']) or 'none'}. Not separated from it (the interval holds 0): "
              f"{', '.join(verdicts['level']) or 'none'}."]
    return lines + _best_against_weakest(rows)


def _interval_note(kinds: set[str]) -> str:
    """How the intervals of the differences table were computed (`kinds`: Interval.how values)."""
    how = {"t": "Student t on the per-seed paired differences of the average",
           "bootstrap": f"percentile bootstrap over the test items of the one seed ({BOOTSTRAP_SAMPLES} resamples, "
                        "items drawn within each domain, the same for both)"}
    if not kinds:
        return "No interval: the runs share no seed, or hold no per-item scores."
    return "Interval: " + "; ".join(how[kind] for kind in sorted(kinds)) + "."


def _best_against_weakest(rows: list[Row]) -> list[str]:
    """Markdown: the best method against the weakest with its interval, for a report without settings."""
    methods = [row for row in rows if not row.is_bound]
    if len(methods) < 2 or any(row.setting for row in methods):
        return []
    ranked = sorted(methods, key=lambda row: statistics.fmean(r.final["mean_accuracy"] for r in row.runs))
    weakest, best = ranked[0], ranked[-1]
    interval = difference(best, weakest)
    if interval is None:
        return []
    verdict = "significant" if interval.excludes_zero else "not significant: the interval holds 0"
    return ["", f"Best method ({best.label}) against the weakest ({weakest.label}): "
            f"{interval.difference:+.2f} points, 95% interval [{interval.low:+.2f}, {interval.high:+.2f}], "
            f"{verdict}."]


def bytes_stats(row: Row, direction: str) -> Stat:
    """Bytes per client per round ("bytes_up" or "bytes_down"), averaged over rounds, then over seeds."""
    per_run = [statistics.fmean(r[direction] for r in run.rounds) for run in row.runs if run.rounds]
    return Stat.of(per_run) if per_run else Stat(0.0, None)


def aggregation_stats(row: Row) -> dict[str, float]:
    """The server's per-round aggregation metrics (cosines to the ideal update, ...), mean over rounds and seeds."""
    values: dict[str, list[float]] = {}
    for run in row.runs:
        for record in run.rounds:
            for name, value in record.get("aggregation", {}).items():
                values.setdefault(name, []).append(value)
    return {name: statistics.fmean(found) for name, found in sorted(values.items())}


def _cell(stat: Stat | None, bold: bool, signed: bool = False) -> str:
    if stat is None:
        return "-"
    mean = f"{stat.mean:+.2f}" if signed else f"{stat.mean:.2f}"
    text = mean if stat.std is None else f"{mean} ± {stat.std:.2f}"
    return f"**{text}**" if bold else text


def _human_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def _seed_note(rows: list[Row]) -> list[str]:
    all_seeds = sorted({seed for row in rows for seed in row.seeds})
    if len(all_seeds) == 1:
        lines = [f"Seed {all_seeds[0]}."]
    else:
        lines = [f"Mean ± sample std over seeds {', '.join(map(str, all_seeds))}."]
    for row in rows:
        missing = sorted(set(all_seeds) - set(row.seeds))
        if missing:
            lines.append(f"Missing: {row.label} has no finished run for seed {', '.join(map(str, missing))}.")
        repeated = sorted({seed for seed in row.seeds if row.seeds.count(seed) > 1})
        if repeated:
            lines.append(f"Repeated: {row.label} has several finished runs for seed {', '.join(map(str, repeated))}.")
    return lines


def markdown_table(rows: list[Row], incomplete: list[str], baseline: str = BASELINE) -> str:
    """comparison.md: accuracy per method and domain like the paper's Table 1 with the starting model's score and
    the gain, the gain per domain, the differences against `baseline` with their intervals, then the communication
    per round."""
    domains = _domains(run for row in rows for run in row.runs)
    setting_keys = [key for key, _ in rows[0].setting]
    lines = [*_score_section(rows, domains, setting_keys), *_gain_section(rows, domains, setting_keys),
             *_personalised_section(rows, domains, setting_keys), *significance_lines(rows, setting_keys, baseline),
             *_eval_loss_section(rows, domains, setting_keys)]
    if incomplete:
        lines += ["", "Not included (not finished): " + "; ".join(incomplete) + "."]
    lines += [*_communication_section(rows, setting_keys), *_aggregation_metrics_section(rows, setting_keys)]
    return "\n".join(lines) + "\n"


def _score_section(rows: list[Row], domains: list[str], setting_keys: list[str]) -> list[str]:
    """Markdown: the task's score per method and domain, with the starting model's Average and the gain where the
    runs scored round 0, and what the table shows."""
    columns = [*domains, "Average"]
    started = any(run.start is not None for row in rows for run in row.runs)  # runs older than round 0 have none
    stats = [{**accuracy_stats(row, domains), "Start": start_stats(row, domains)["Average"],
              "Gain": gain_stats(row, domains)["Average"]} for row in rows]
    shown = [*columns, "Start", "Gain"] if started else columns
    metric = score_name(rows)
    title = f"{metric[0].upper()}{metric[1:]}"
    return [f"## {title} (%)", "", *_stats_table(rows, setting_keys, shown, stats, best=max),
            "", _score_note(rows, title, started)]


def _score_note(rows: list[Row], title: str, started: bool) -> str:
    """What the score table shows: the score, Start and Gain, the seeds, the bold cells and the bounds."""
    bounds = [row.label for row in rows if row.is_bound]
    return (f"{title} of the global model on each domain's test split after the last round; Average is the "
            "mean over domains" + ("; Start is the starting model's Average (round 0: the pretrained backbone with "
                                   "a fresh LoRA and head, scored the same way) and Gain is Average - Start, in "
                                   "points" if started else "") + ". "
            + " ".join(_seed_note(rows)) + " Best per column in bold" + (", bounds left out." if bounds else ".")
            + (f" Bounds, not methods: {', '.join(bounds)} (centralized: one client holding every client's data, "
               "the same steps per round; local: each client alone, never aggregated, scored on its own domain)."
               if bounds else ""))


def _gain_section(rows: list[Row], domains: list[str], setting_keys: list[str]) -> list[str]:
    """Markdown: the gain over the starting model per method and domain, below the starting model's scores;
    nothing when no run scored round 0."""
    columns = [*domains, "Average"]
    gains = [gain_stats(row, domains) for row in rows]
    if all(gain["Average"] is None for gain in gains):
        return []
    starts = start_stats(rows[0], domains)
    lines = ["", "## Gain over the starting model (points)", "", *_table_head(setting_keys, columns),
             _table_row(["Start (round 0, %)", *([""] * len(setting_keys)),
                         *(_cell(starts[column], False) for column in columns)])]
    for row, gain in zip(rows, gains, strict=True):
        lines.append(_table_row([row.label if row.is_bound else method_name(row.method), *_setting_cells(row),
                                 *(_cell(gain[column], False, signed=True) for column in columns)]))
    return lines


def _personalised_section(rows: list[Row], domains: list[str], setting_keys: list[str]) -> list[str]:
    """Markdown: each client's own model on its own domain, for the rows that scored it; else nothing."""
    own = personalised_rows(rows)
    if not own:
        return []
    columns = [*domains, "Average"]
    return ["", f"## Personalised {score_name(rows)} (%)", "",
            *_stats_table(own, setting_keys, columns, [personalised_stats(row, domains) for row in own], max),
            "", "Each client's own model (the global model's shared factors with what the client keeps of its "
            "own: factors, or a local adapter mixed in per input) on its own domain's test split after the last "
            "round, for the methods whose clients keep something of their own; a domain's score is the mean over "
            "its clients. The local bound, each client alone, for reference. Best per column in bold, bounds left "
            "out."]


def _eval_loss_section(rows: list[Row], domains: list[str], setting_keys: list[str]) -> list[str]:
    """Markdown: the eval loss per method and domain, for language models' runs; else nothing."""
    if not has_eval_loss(rows):
        return []
    columns = [*domains, "Average"]
    return ["", "## Eval loss", "",
            *_stats_table(rows, setting_keys, columns, [eval_loss_stats(row, domains) for row in rows], min),
            "", "Mean cross-entropy of the global model over each domain's test split after the last round "
            "(instruction data: the response tokens). Best (lowest) per column in bold."]


def _communication_section(rows: list[Row], setting_keys: list[str]) -> list[str]:
    """Markdown: bytes up and down per client per round, per method."""
    lines = ["", "## Communication per client per round", "", *_table_head(setting_keys, ["Upload", "Download"])]
    for row in rows:
        lines.append(_table_row([method_name(row.method), *_setting_cells(row),
                                 _human_bytes(bytes_stats(row, "bytes_up").mean),
                                 _human_bytes(bytes_stats(row, "bytes_down").mean)]))
    return lines


def _aggregation_metrics_section(rows: list[Row], setting_keys: list[str]) -> list[str]:
    """Markdown: the server's aggregation metrics per method, where any method logged one; else nothing."""
    metrics = [aggregation_stats(row) for row in rows]
    names = sorted({name for found in metrics for name in found})
    if not names:
        return []
    lines = ["", "## Server aggregation metrics", "",
             "Logged by the aggregation method every round, mean over rounds and seeds; - where a method does "
             "not log it.", "", *_table_head(setting_keys, names)]
    for row, found in zip(rows, metrics, strict=True):
        lines.append(_table_row([method_name(row.method), *_setting_cells(row),
                                 *(f"{found[name]:.6f}" if name in found else "-" for name in names)]))
    return lines


def _table_row(cells: list[str]) -> str:
    """One line of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def _table_head(setting_keys: list[str], columns: list[str], aligns: list[str] | None = None) -> list[str]:
    """A markdown table's header and alignment lines: Method and the setting keys left-aligned, then `columns`
    right-aligned (or aligned as `aligns` says)."""
    return [_table_row(["Method", *setting_keys, *columns]),
            _table_row([":--"] * (1 + len(setting_keys)) + (aligns or ["--:"] * len(columns)))]


def _setting_cells(row: Row) -> list[str]:
    """The row's setting values (a grid's swept options) as table cells."""
    return [format_value(value) for _, value in row.setting]


def _stats_table(rows: list[Row], setting_keys: list[str], columns: list[str],
                 stats: list[dict[str, Stat | None]], best: Callable[..., float]) -> list[str]:
    """Markdown lines of one row per method and one cell per column, the `best` mean of each column over the
    methods (not the bounds) in bold."""
    best_of = {column: best((round(s[column].mean, 2) for row, s in zip(rows, stats, strict=True)
                             if s[column] is not None and not row.is_bound), default=None)
               for column in columns}
    lines = _table_head(setting_keys, columns)
    for row, row_stats in zip(rows, stats, strict=True):
        cells = [method_name(row.method), *_setting_cells(row)]
        for column in columns:
            stat = row_stats[column]
            is_best = (len(rows) > 1 and stat is not None and not row.is_bound and column != "Start"
                       and round(stat.mean, 2) == best_of[column])
            cells.append(_cell(stat, is_best))
        lines.append(_table_row(cells))
    return lines


def csv_table(rows: list[Row], baseline: str = BASELINE) -> str:
    """comparison.csv: the numbers of comparison.md, one row per table row, std empty with a single seed. Where some
    method scored each client's own model, the personalised columns follow the gain's, filled for the rows of the
    Personalised table and empty for the others."""
    domains = _domains(run for row in rows for run in row.runs)
    losses = has_eval_loss(rows)
    own = personalised_rows(rows)
    metrics = [aggregation_stats(row) for row in rows]
    names = sorted({name for found in metrics for name in found})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_csv_header(rows, domains, baseline, losses, bool(own), names))
    for row, found in zip(rows, metrics, strict=True):
        line = _csv_cells_of_row(rows, row, domains, baseline, losses, own)
        writer.writerow(line + [f"{found[name]:.6f}" if name in found else "" for name in names])
    return buffer.getvalue()


def _csv_header(rows: list[Row], domains: list[str], baseline: str, losses: bool, own: bool,
                names: list[str]) -> list[str]:
    header = ["method", "name", *(key for key, _ in rows[0].setting), "seeds"]
    for column in [*domains, "average"]:
        header += [f"{column}_mean", f"{column}_std"]
    for part in ("start", "gain", *(["personalised"] if own else [])):
        header += [f"{column}_{part}_{stat}" for column in [*domains, "average"] for stat in ("mean", "std")]
    header += [f"vs_{baseline}_difference", f"vs_{baseline}_low", f"vs_{baseline}_high", f"vs_{baseline}_interval"]
    if losses:
        header += [f"{column}_eval_loss_{part}" for column in [*domains, "average"] for part in ("mean", "std")]
    return [*header, "bytes_up", "bytes_down", *names]


def _csv_cells_of_row(rows: list[Row], row: Row, domains: list[str], baseline: str, losses: bool,
                      own: list[Row]) -> list[str]:
    """A row's cells up to its aggregation metrics, in the order of `_csv_header`."""
    columns = [*domains, "Average"]
    line = [row.method, method_name(row.method),
            *(format_value(value) for _, value in row.setting), " ".join(map(str, row.seeds))]
    line += _csv_cells(accuracy_stats(row, domains), columns, 2)
    line += _csv_cells(start_stats(row, domains), columns, 2)
    line += _csv_cells(gain_stats(row, domains), columns, 2)
    if own:
        line += _csv_cells(personalised_stats(row, domains) if row in own else dict.fromkeys(columns), columns, 2)
    base = baseline_row(rows, row, baseline)
    interval = difference(row, base) if base is not None and base is not row else None
    line += (["", "", "", ""] if interval is None else
             [f"{interval.difference:.2f}", f"{interval.low:.2f}", f"{interval.high:.2f}", interval.how])
    if losses:
        line += _csv_cells(eval_loss_stats(row, domains), columns, 4)
    return [*line, f"{bytes_stats(row, 'bytes_up').mean:.0f}", f"{bytes_stats(row, 'bytes_down').mean:.0f}"]


def _csv_cells(stats: dict[str, Stat | None], columns: list[str], digits: int) -> list[str]:
    """Mean and std of each column; empty where missing (std: with a single seed)."""
    cells = []
    for column in columns:
        stat = stats[column]
        cells += ["", ""] if stat is None else [f"{stat.mean:.{digits}f}",
                                                "" if stat.std is None else f"{stat.std:.{digits}f}"]
    return cells


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=120, metadata=PNG_METADATA)


def round_curve(row: Row, personalised: bool = False) -> tuple[list[int], list[Stat]]:
    """The rounds a row's runs scored (0: the starting model) and the mean accuracy in percent over seeds at each;
    `personalised`: each client's own model's (the starting model is every client's own at round 0)."""
    per_round: dict[int, list[float]] = {}
    for run in row.runs:
        scored = [(int(entry["round"]), entry.get(PERSONALISED, {}) if personalised else entry)
                  for entry in run.rounds]
        for round_index, entry in [*([(0, run.start)] if run.start else []), *scored]:
            if "mean_accuracy" in entry:
                per_round.setdefault(round_index, []).append(100 * entry["mean_accuracy"])
    rounds = sorted(per_round)
    return rounds, [Stat.of(per_round[r]) for r in rounds]


def plot_accuracy_vs_round(rows: list[Row], path: Path) -> None:
    """Mean accuracy per round per row, shaded +- std over seeds (the paper's Figure 4); for the methods that scored
    each client's own model, its mean as a dotted line of the row's colour."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for index, row in enumerate(rows):
        color = _colour(index if row.setting else _method_rank(row.method))
        curves = [(*round_curve(row), row.label, "--" if row.is_bound else "-")]
        if any(run.personalised is not None for run in row.runs):
            curves.append((*round_curve(row, personalised=True), f"{row.label}, personalised", ":"))
        for rounds, stats, label, style in curves:
            ax.plot(rounds, [s.mean for s in stats], marker="o", markersize=3, color=color, label=label,
                    linestyle=style)
            if len(row.runs) > 1:
                ax.fill_between(rounds, [s.mean - (s.std or 0) for s in stats],
                                [s.mean + (s.std or 0) for s in stats], color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("Round (0: the starting model)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"Average {score_name(rows)} over domains (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_communication(rows: list[Row], path: Path) -> None:
    """Upload and download bytes per client per round per row (the paper's Figure 5)."""
    up = [bytes_stats(row, "bytes_up").mean for row in rows]
    down = [bytes_stats(row, "bytes_down").mean for row in rows]
    unit, size = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if max(up + down) >= s), ("B", 1))
    fig = Figure(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    positions = range(len(rows))
    ax.bar([p - 0.2 for p in positions], [u / size for u in up], width=0.4, label="Upload")
    ax.bar([p + 0.2 for p in positions], [d / size for d in down], width=0.4, label="Download")
    ax.set_xticks(list(positions), [row.label for row in rows], rotation=30 if len(rows) > 4 else 0, ha="right"
                  if len(rows) > 4 else "center")
    ax.set_ylabel(f"{unit} per client per round")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    _save(fig, path)


def plot_sweep(rows: list[Row], path: Path) -> None:
    """Final average accuracy against the one swept value, one line per method (the paper's Figures 6 and 7)."""
    key = rows[0].setting[0][0]
    values = sorted({json.dumps(row.setting[0][1]) for row in rows}, key=lambda text: _sort_key(json.loads(text)))
    position = {text: index for index, text in enumerate(values)}
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    methods = list(dict.fromkeys(row.method for row in rows))
    for method in methods:
        method_rows = [row for row in rows if row.method == method]
        xs = [position[json.dumps(row.setting[0][1])] for row in method_rows]
        stats = [Stat.of([100 * run.final["mean_accuracy"] for run in row.runs]) for row in method_rows]
        ax.errorbar(xs, [s.mean for s in stats], yerr=[s.std or 0 for s in stats], marker="o", capsize=3,
                    color=_colour(_method_rank(method)), label=method_name(method))
    ax.set_xticks(range(len(values)), [format_value(json.loads(text)) for text in values])
    ax.set_xlabel(key)
    ax.set_ylabel(f"Final average {score_name(rows)} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def sweep_plot_name(key: str) -> str:
    return f"accuracy_vs_{key}.png"


def report(dir: Path, skip_bad: bool = False, baseline: str = BASELINE) -> list[str]:
    """Write comparison.md, comparison.csv and the plots into `dir` from every finished run below it; each row is
    compared with the runs of `baseline` (paired 95% intervals).

    A results.json that cannot be read stops the report (UserError naming it), or with `skip_bad` is left out and
    listed in comparison.md; the returned lines describe the ones left out."""
    directory = Path(dir)
    if not directory.is_dir():
        raise UserError(f"report: {directory} is not a folder; pass the --out_dir of a compare or fit run")
    runs, incomplete, bad = load_runs(directory)
    if bad and not skip_bad:
        raise UserError(f"report: {bad[0]}; fix or delete it" + (f" ({len(bad) - 1} more such files)" if len(bad) > 1
                                                                  else ""))
    for line in incomplete:
        print(f"lorafair report: not finished, left out: {line}", file=sys.stderr)
    incomplete += bad
    if not runs:
        raise UserError(f"report: no finished run under {directory} (no results.json with a 'final' entry); "
                        "run `lorafair compare` or `lorafair fit` with --out_dir inside it first")
    rows = group_rows(runs)
    table = markdown_table(rows, incomplete, baseline)
    write_text_atomic(directory / TABLE_NAME, table)
    write_text_atomic(directory / CSV_NAME, csv_table(rows, baseline))
    written = [TABLE_NAME, CSV_NAME, ROUNDS_PLOT_NAME, COMMUNICATION_PLOT_NAME]
    with matplotlib.style.context("default"):
        plot_accuracy_vs_round(rows, directory / ROUNDS_PLOT_NAME)
        plot_communication(rows, directory / COMMUNICATION_PLOT_NAME)
        if len(rows[0].setting) == 1:
            name = sweep_plot_name(rows[0].setting[0][0])
            plot_sweep(rows, directory / name)
            written.append(name)
    print(table)
    print(f"lorafair report: wrote {', '.join(written)} in {directory}")
    return bad
