"""The run folder: what a run leaves behind, its file names, whether it finished, and the config's plain forms.

    <out_dir>/.lorafair_run      the marker of a lorafair run folder (no other folder is written into)
    <out_dir>/config.yaml        the resolved config
    <out_dir>/classes.json       class names; label i is classes[i]
    <out_dir>/results.json       per-round records, rewritten after every round
    <out_dir>/tensorboard/       TensorBoard scalars and hparams
    <out_dir>/checkpoints/       round_NNNNN.ckpt (lorafair.federated.checkpoints)
    <out_dir>/final/             the global model exported for timm (or transformers) and peft (lorafair.export),
                                 with the marker .lorafair_export (only a folder carrying it is ever replaced);
                                 not written with export false

results.json is rewritten atomically after every round, so a reader (or `lorafair report`) never sees half a file:
{"method", "domains", "rounds": [per-round record], "final": {"round", "accuracy", "mean_accuracy"[, "eval_loss",
"mean_eval_loss"]}};
"final" appears once the last round is done.
Accuracies are fractions in [0, 1]; bytes are per client per round.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml
from filelock import FileLock, Timeout

from lorafair.config import FitConfig
from lorafair.errors import UserError
from lorafair.files import write_json

CONFIG_NAME = "config.yaml"
CLASSES_NAME = "classes.json"
RESULTS_NAME = "results.json"
TENSORBOARD_NAME = "tensorboard"
CHECKPOINTS_NAME = "checkpoints"
EXPORT_NAME = "final"
RUN_MARKER = ".lorafair_run"
"""The file that makes a folder a lorafair run folder, written when `fit` first takes the folder."""
EXPORT_MARKER = ".lorafair_export"
"""The file that makes a folder a lorafair export: only such a folder is ever replaced by an export."""
LOCK_NAME = ".lorafair.lock"
RUN_ENTRIES = frozenset({CONFIG_NAME, CLASSES_NAME, RESULTS_NAME, TENSORBOARD_NAME, CHECKPOINTS_NAME, EXPORT_NAME,
                         RUN_MARKER, LOCK_NAME})
"""Every name a run folder holds."""

EXECUTION_KEYS = frozenset({"out_dir", "resume", "resume_force", "overwrite", "export", "accelerator", "precision",
                            "num_nodes", "cpu_threads", "federation.rounds", "federation.eval_every",
                            "federation.timeout", "data.num_workers", "data.eval_batch_size"})
"""Settings free to change on resume: how long a run lasts, how it executes (accelerator and precision change
the numerics a little, not the experiment) and whether it writes its export."""

PER_RUN_KEYS = frozenset({"seed", "out_dir", "resume", "server.method", "federation.setting", "export"})
"""Settings that differ between the runs of one comparison by design, or that change no result (export: whether a
run writes final/), so they never make a report row of their own, nor a grid, nor count as a changed config."""

RunStatus = Literal["done", "unreadable", "resume", "new"]


def results_path(out_dir: Path) -> Path:
    return Path(out_dir) / RESULTS_NAME


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_NAME


def is_finished(results: Any) -> bool:
    """A run is complete once its results.json holds the final evaluation."""
    return isinstance(results, dict) and isinstance(results.get("final"), dict)


def run_status(out_dir: Path) -> RunStatus:
    """done: results.json holds the final evaluation; unreadable: results.json is not one lorafair wrote (the run is
    left alone); resume: a checkpoint was written; new: anything else."""
    results = results_path(out_dir)
    if results.is_file():
        try:
            if is_finished(read_results(results)):
                return "done"
        except UserError:
            return "unreadable"
    checkpoints = checkpoint_dir(out_dir)
    return "resume" if checkpoints.is_dir() and any(p.is_file() for p in checkpoints.rglob("*")) else "new"


def read_results(path: Path) -> dict[str, Any]:
    """A results.json as `lorafair fit` writes it, or a UserError naming the file and what is wrong with it."""
    try:
        results = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as err:
        raise UserError(f"results file {path} cannot be read ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise UserError(f"results file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise UserError(f"results file {path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}; "
                        f"cut short?)") from err
    problem = results_problem(results)
    if problem:
        raise UserError(f"results file {path} is not a lorafair results.json: {problem}")
    results["rounds"] = [current_round_record(record) for record in results["rounds"]]
    return results


def current_round_record(record: dict[str, Any]) -> dict[str, Any]:
    """A round record of results.json with this version's keys: `ranks` of earlier versions (client id -> the
    process that trained it) read as `processes`."""
    if "ranks" in record and "processes" not in record:
        return {("processes" if key == "ranks" else key): value for key, value in record.items()}
    return record


def results_problem(results: Any) -> str | None:
    """What keeps `results` from being a lorafair results.json (the keys report and compare read), or None."""
    if not isinstance(results, dict):
        return f"it holds {json.dumps(results)[:40]} instead of an object"
    rounds = results.get("rounds")
    if not isinstance(rounds, list) or not all(isinstance(record, dict) for record in rounds):
        return "'rounds' is missing or not a list of objects"
    final = results.get("final")
    if final is None:
        return None
    if not isinstance(final, dict) or not isinstance(final.get("accuracy"), dict):
        return "'final' has no 'accuracy' object"
    if not all(isinstance(value, int | float) for value in [*final["accuracy"].values(), final.get("mean_accuracy")]):
        return "'final' has a non-numeric accuracy or no 'mean_accuracy'"
    return None


def check_out_dir(out_dir: Path) -> None:
    """Create `out_dir` and write a probe file in it, so an unusable folder (a file, read-only, a parent that is a
    file) is one line before any data or model is loaded rather than a traceback after the first round. The root
    and the home folder are refused: lorafair deletes what it wrote in a run folder."""
    refuse_shared_folder(out_dir, "out_dir")
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # a name of its own: every rank probes at once
            pass
    except OSError as err:
        raise UserError(f"out_dir: cannot write the run folder {out_dir} ({err.strerror or err}); pass --out_dir a "
                        f"folder that can be created and written") from err


def refuse_shared_folder(folder: Path, key: str) -> None:
    """A UserError where `folder` is the file system's root or the user's home folder, which no run may own."""
    resolved = Path(folder).expanduser().resolve()
    what = ("the root folder" if resolved == Path(resolved.anchor)
            else "your home folder" if resolved == Path.home().resolve() else None)
    if what:
        raise UserError(f"{key}: {folder} is {what}; lorafair writes (and replaces) files in it: pass a folder of "
                        f"its own, e.g. {Path.home() / 'runs' / 'NAME'}")


def foreign_entries(out_dir: Path) -> list[str]:
    """What in an existing `out_dir` without the run marker lorafair did not write: any name a run folder does not
    have, and a results.json or config.yaml that is not lorafair's (a run folder written before the marker existed
    has none of these and is taken over)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    known = RUN_ENTRIES | {f"{name}.tmp" for name in RUN_ENTRIES}
    foreign = sorted(path.name for path in out_dir.iterdir() if path.name not in known)
    if (out_dir / RESULTS_NAME).exists():
        try:
            read_results(out_dir / RESULTS_NAME)
        except UserError:
            foreign.append(f"{RESULTS_NAME} (not one lorafair wrote)")
    if (out_dir / CONFIG_NAME).exists() and not _is_fit_config(out_dir / CONFIG_NAME):
        foreign.append(f"{CONFIG_NAME} (not a lorafair config)")
    return foreign


def _is_fit_config(path: Path) -> bool:
    """Whether `path` reads as a config.yaml `fit` wrote: a mapping of FitConfig's keys, its sections among them."""
    try:
        config = yaml.safe_load(path.read_text()) if path.stat().st_size < 1_000_000 else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    keys = {field.name for field in dataclasses.fields(FitConfig)}
    return isinstance(config, dict) and {"model", "data", "federation", "server"} <= set(config) <= keys


def claim_run_folder(out_dir: Path) -> None:
    """Before a run touches `out_dir` (rank 0 of `fit` and of the Flower server): make it lorafair's, or refuse it
    with one line. A folder with the run marker is a lorafair run's; an empty or missing one, or one holding only
    what a run folder holds, gets the marker; anything else (files lorafair did not write, another run's export
    folder, a comparison) is refused, so that nothing a run replaces or deletes was someone else's."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    _refuse_foreign(out_dir)
    export = out_dir / EXPORT_NAME
    if export.exists() and not is_export(export):
        raise UserError(f"out_dir {out_dir} holds a {EXPORT_NAME}/ that is not a lorafair export (no {EXPORT_MARKER} "
                        f"in it), and a run replaces {EXPORT_NAME}/ with its export; move it away or pass another "
                        f"--out_dir")
    if not (out_dir / RUN_MARKER).is_file():
        write_json(out_dir / RUN_MARKER, {"lorafair": "run folder", "format": 1})


def _refuse_foreign(out_dir: Path) -> None:
    foreign = [] if (out_dir / RUN_MARKER).is_file() else foreign_entries(out_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"out_dir {out_dir} holds files lorafair did not write ({shown}) and is not a lorafair run "
                        f"folder (no {RUN_MARKER} in it); pass --out_dir a new or empty folder")


@contextmanager
def own_run_folder(out_dir: Path, lead: bool = True) -> Iterator[None]:
    """For the life of a run: `out_dir` claimed (claim_run_folder) and locked against every other lorafair process
    (hold_folder). Ranks other than the lead only check that they can write it (their disk may be their own)."""
    if not lead:
        check_out_dir(out_dir)
        yield
        return
    check_out_dir(out_dir)
    _refuse_foreign(Path(out_dir))  # before the lock file is written into a folder that is not lorafair's
    with hold_folder(out_dir, "--out_dir"):
        claim_run_folder(out_dir)
        yield


_HELD: set[Path] = set()
"""The folders this process holds the lock of (a process may enter one again: fit exports into its own folder)."""


@contextmanager
def hold_folder(folder: Path, flag: str) -> Iterator[None]:
    """Hold the exclusive lock of `folder` (its LOCK_NAME file, released when the process ends however it ends)
    while the block runs; a folder another process holds is one UserError at once, naming it."""
    key = Path(folder).resolve()
    if key in _HELD:
        yield
        return
    lock = FileLock(key / LOCK_NAME, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{folder} is in use by another lorafair process (it holds {key / LOCK_NAME}); wait for it "
                        f"to end, or pass {flag} another folder") from None
    except OSError as err:
        raise UserError(f"{flag}: cannot lock {folder} ({err.strerror or err}); pass a folder lorafair can write"
                        ) from err
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        lock.release()


def is_export(folder: Path) -> bool:
    """Whether `folder` is an export lorafair wrote (and may replace)."""
    return Path(folder).is_dir() and (Path(folder) / EXPORT_MARKER).is_file()


def run_config(out_dir: Path, results: dict) -> dict[str, Any]:
    """A run's resolved config: the "config" entry of its results.json, else the config.yaml beside it."""
    if isinstance(results.get("config"), dict):
        return results["config"]
    path = Path(out_dir) / CONFIG_NAME
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def trajectory_identity(flat_config: Mapping[str, Any], fingerprints: Mapping[str, str]) -> dict[str, Any]:
    """The settings that determine a run's results, from a flat {section.key: value} config, plus the fingerprints
    of the data and weights behind them (lorafair.federated.fingerprints), which can change under the same config."""
    return {**{key: value for key, value in flat_config.items() if key not in EXECUTION_KEYS}, **fingerprints}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as nested plain values (paths as strings), ready for YAML, JSON and checkpoints; the
    only way lorafair turns a config into plain values."""
    def plain(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return str(value)
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [plain(item) for item in value]
        return value

    return plain(dataclasses.asdict(cfg))


def read_fit_config(folder: Path) -> FitConfig:
    """The FitConfig of the config.yaml in a run folder (or an export of one): config_to_dict undone, sections back
    to their dataclasses and paths back to Path; a file that is no lorafair config is one UserError."""
    def typed(cls: type, values: Mapping[str, Any]) -> Any:
        hints = get_type_hints(cls)
        fields = {}
        for name, value in values.items():
            if dataclasses.is_dataclass(hints[name]):
                value = typed(hints[name], value)
            elif value is not None and get_origin(hints[name]) is list and get_args(hints[name]) == (Path,):
                value = [Path(item) for item in value]  # text.train_files, text.test_files
            elif value is not None and Path in (hints[name], *get_args(hints[name])):
                value = Path(value)
            fields[name] = value
        return cls(**fields)

    path = Path(folder) / CONFIG_NAME
    try:
        return typed(FitConfig, yaml.safe_load(path.read_text()))
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError) as err:
        raise UserError(f"{path} cannot be read as a lorafair config ({type(err).__name__}: {err}); pass a folder "
                        f"that `lorafair fit` wrote") from err


def flatten_config(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"name": x}} -> {"model.name": x}: one level, the config sections (model.kwargs stays a dict);
    the only way lorafair flattens a config."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping) and not prefix:
            flat.update(flatten_config(value, prefix=f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def score_scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """The scores of a round's record (or of the starting model's entry, at step 0) as TensorBoard scalars."""
    scalars: dict[str, float] = {}
    if "accuracy" in entry:
        scalars.update({f"accuracy/{domain}": acc for domain, acc in entry["accuracy"].items()})
        scalars["accuracy/mean"] = entry["mean_accuracy"]
    if "eval_loss" in entry:
        scalars.update({f"eval_loss/{domain}": loss for domain, loss in entry["eval_loss"].items()})
        scalars["eval_loss/mean"] = entry["mean_eval_loss"]
    return scalars


GLOBAL_MODEL = "global_model"
"""The key, at the top of results.json (so in every round's checkpoint) and in each evaluated round's record, of why
the run has no global model (absent where it has one): export, evaluate and predict refuse such a run with it."""

PERSONALISED = "personalised"
"""The key of each client's own model's scores in a round's record and of their final block in results.json, and
the prefix of their TensorBoard scalars (personalised/accuracy/<domain>), where clients keep factors of their own."""


def tensorboard_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one round's record, named for TensorBoard's grouping (accuracy/clipart, seconds/train, ...)."""
    scalars = score_scalars(record)
    if PERSONALISED in record:
        scalars.update({f"{PERSONALISED}/{name}": value for name, value in score_scalars(record[PERSONALISED]).items()})
    losses = record["train_loss"]
    scalars.update({f"train_loss/client_{client}": loss for client, loss in losses.items()})
    if losses:
        scalars["train_loss/mean"] = mean(list(losses.values()))
    scalars["bytes/up_per_client"] = record["bytes_up"]
    scalars["bytes/down_per_client"] = record["bytes_down"]
    scalars["bad_updates"] = len(record["bad_updates"])
    scalars.update({f"seconds/{phase}": seconds for phase, seconds in record["seconds"].items()})
    scalars["seconds/overhead_fraction"] = record["overhead"]
    scalars.update({f"aggregation/{name}": value for name, value in record["aggregation"].items()})
    return scalars


def accuracy_table(accuracy: Mapping[str, float], mean_accuracy: float, title: str,
                   eval_loss: Mapping[str, float] | None = None, start: Mapping[str, float] | None = None,
                   metric: str = "top-1 accuracy") -> str:
    """Per-domain scores (in percent, as the paper reports them) and the mean, as an aligned text table, its column
    named by `metric` (config.metric_name: top-1 accuracy, or exact match); with `start` (the starting model's
    score per domain), columns of the start and of the gain (final - start) first; with `eval_loss`, a column of
    the eval loss per domain and its mean."""
    rows = [*accuracy.items(), ("mean", mean_accuracy)]
    starts = None if start is None else [*(start[domain] for domain in accuracy), mean(list(start.values()))]
    losses = None if eval_loss is None else [*eval_loss.values(), mean(list(eval_loss.values()))]
    width = max(len("domain"), *(len(domain) for domain, _ in rows))
    column = f"{metric.removesuffix(' accuracy')} %"
    score = max(7, len(column))
    lines = [title, f"{'domain':<{width}}" + ("  start %" if starts else "") + f"  {column:>{score}}"
             + ("     gain" if starts else "") + ("  eval loss" if losses else ""),
             f"{'-' * width}" + ("  -------" if starts else "") + f"  {'-' * score}" + ("  -------" if starts else "")
             + ("  ---------" if losses else "")]
    for i, (domain, value) in enumerate(rows):
        line = f"{domain:<{width}}" + (f"  {100 * starts[i]:7.2f}" if starts else "") + f"  {100 * value:{score}.2f}"
        line += f"  {100 * (value - starts[i]):+7.2f}" if starts else ""
        lines.append(line + (f"  {losses[i]:9.4f}" if losses else ""))
    return "\n".join(lines)
