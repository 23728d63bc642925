"""`lorafair compare`: one config run once per method, seed and grid value, then one paper-style report.

Runs go one after another into `<out_dir>/<method>[-<key>=<value>]/seed<seed>/`, so `tensorboard --logdir out_dir`
shows them side by side. Calling compare again with the same arguments picks up where it stopped: finished runs
are kept, a run with checkpoints resumes, the rest start.

Under torchrun every rank walks the same list and calls fit with the same config; rank 0 writes the report. Ranks
may not share a disk, so there no run is skipped by what one rank sees on its disk: every run goes to fit with
resume="auto", whose rank 0 finds the checkpoint and tells the others (a finished run then trains no more rounds).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from jsonargparse import ArgumentParser

from lorafair.aggregation import method_class, method_options
from lorafair.config import BASELINE, BOUND_METHOD, BOUNDS, FitConfig, comparable
from lorafair.errors import UserError
from lorafair.federated.run_folder import (
    PER_RUN_KEYS,
    config_to_dict,
    flatten_config,
    hold_folder,
    refuse_shared_folder,
    results_path,
    run_config,
    run_status,
)
from lorafair.processes import die_with_parent
from lorafair.reporting.report import format_value, report


@dataclass(frozen=True)
class PlannedRun:
    """One fit of a comparison: everything but method, seed and the grid value equals the base config."""

    method: str
    seed: int
    override: tuple[str, Any] | None
    """(key, value) of the grid point, None without --grid."""
    cfg: FitConfig
    """The config this run fits with; cfg.out_dir is the run folder."""


def _holds_collection(hint: Any) -> bool:
    members = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    return any((get_origin(member) or member) in (list, dict, tuple) for member in members)


def grid_keys() -> dict[str, Any]:
    """Every key --grid can sweep, with the type its values are parsed as (scalars only; method and seed have
    their own options)."""
    keys: dict[str, Any] = {}
    top_hints = get_type_hints(FitConfig)
    for top in fields(FitConfig):
        hint = top_hints[top.name]
        if is_dataclass(hint):
            section_hints = get_type_hints(hint)
            keys.update({f"{top.name}.{f.name}": section_hints[f.name] for f in fields(hint)})
        else:
            keys[top.name] = hint
    return {key: hint for key, hint in sorted(keys.items())
            if key not in PER_RUN_KEYS and not _holds_collection(hint)}


def _describe(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def parse_grid(grid: str) -> tuple[str, list[Any]]:
    """'server.lam=0,0.001,0.01' -> ('server.lam', [0.0, 0.001, 0.01]), each value parsed as the field's type."""
    key, sep, text = grid.partition("=")
    key = key.strip()
    valid = grid_keys()
    if key in ("server.method", "seed"):
        raise UserError(f"--grid: {key} has its own option, use --{'methods' if key == 'server.method' else 'seeds'}")
    if not sep or key not in valid:
        raise UserError(f"--grid: expected KEY=V1,V2,... with KEY one of {', '.join(valid)}; got {grid!r}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=valid[key])
    values: list[Any] = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value = parser.parse_args(["--value", item]).value
        except Exception as err:
            raise UserError(f"--grid: {key}={item!r} is not valid, expected {_describe(valid[key])}") from err
        if value not in values:
            values.append(value)
    return key, values


def _with_override(cfg: FitConfig, key: str, value: Any) -> FitConfig:
    section, _, name = key.rpartition(".")
    if not section:
        return replace(cfg, **{name: value})
    return replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})


def default_methods(cfg: FitConfig) -> list[str]:
    """What compare runs without --methods: every method and both bounds, less the methods that refuse clients of
    other ranks where the config has them (named on stderr)."""
    methods = list(comparable())
    if cfg.lora.client_ranks:
        fixed = [m for m in methods if m not in BOUNDS and not method_class(m).mixed_ranks]
        if fixed:
            print(f"lorafair compare: note: lora.client_ranks is set: leaving out {', '.join(fixed)}, which train "
                  "every client at one rank", file=sys.stderr)
        methods = [m for m in methods if m not in fixed]
    return methods


def plan_runs(cfg: FitConfig, methods: list[str] | None, seeds: list[int] | None,
              grid: str | None) -> list[PlannedRun]:
    """Every run of a comparison, seed by seed (a full table exists after the first seed), validated up front. A
    bound is a run of its federation.setting (None: every method that can run the config, and both bounds)."""
    methods = default_methods(cfg) if methods is None else methods
    unknown = [method for method in methods if method not in comparable()]
    if unknown or not methods:
        raise UserError(f"--methods: unknown method {', '.join(unknown) or '(none given)'}; "
                        f"valid: {', '.join(comparable())}")
    if cfg.resume not in (None, "auto"):
        raise UserError("resume: compare resumes each run from its own folder; drop --resume or pass 'auto'")
    if cfg.overwrite:
        raise UserError("overwrite: compare keeps finished runs and resumes the others; delete a run's folder to run "
                        "it again")
    methods = list(dict.fromkeys(methods))
    seeds = list(dict.fromkeys(seeds)) if seeds else [cfg.seed]
    key, values = parse_grid(grid) if grid else (None, [None])
    planned = []
    for seed in seeds:
        for value in values:
            for method in methods:
                name = method if key is None else f"{method}-{key}={format_value(value).replace(os.sep, '_')}"
                bound = method in BOUNDS
                run_cfg = replace(cfg, seed=seed, resume=None, out_dir=Path(cfg.out_dir) / name / f"seed{seed}",
                                  server=replace(cfg.server, method=BOUND_METHOD if bound else method),
                                  federation=replace(cfg.federation, setting=method if bound else "federated"))
                if key is not None:
                    run_cfg = _with_override(run_cfg, key, value)
                run_cfg.validate()
                planned.append(PlannedRun(method, seed, None if key is None else (key, value), run_cfg))
    return planned


def config_differences(folder: Path, cfg: FitConfig) -> list[str]:
    """Keys where a finished run's recorded config differs from the planned one (its folder is reused as is)."""
    recorded = flatten_config(run_config(folder, json.loads(results_path(folder).read_text())))
    planned = flatten_config(config_to_dict(cfg))
    return [f"{key}: {format_value(recorded[key])} -> {format_value(planned[key])}"
            for key in sorted(recorded.keys() & planned.keys() - PER_RUN_KEYS) if recorded[key] != planned[key]]


LOGS_NAME = "logs"
"""Folder of a comparison holding each run's output when runs go in parallel (`--jobs`)."""


def _fit_logged(cfg: FitConfig, log: Path) -> float:
    """One run in a worker process, its output (Python's and the libraries' below it) appended to `log`; returns
    its seconds."""
    from lorafair.fit import fit

    die_with_parent()  # a killed compare takes its runs with it (their checkpoints stay: the same command resumes)
    started = time.monotonic()
    with open(log, "a") as stream:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        try:
            fit(cfg)
            return time.monotonic() - started
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def fit_in_parallel(pending: list[tuple[str, FitConfig]], jobs: int, logs: Path) -> None:
    """Fit `jobs` runs at a time, each in a fresh process; a run that fails stops no other, and the first failure
    is raised once all have ended (the finished ones are kept, a rerun resumes the rest)."""
    logs.mkdir(parents=True, exist_ok=True)
    if jobs > (os.cpu_count() or 1):
        print(f"lorafair compare: note: --jobs {jobs} is more than this machine's {os.cpu_count()} cores; the runs "
              "share them", file=sys.stderr)
    jobs = min(jobs, len(pending))  # no more processes than runs
    failures: list[str] = []
    context = multiprocessing.get_context("spawn")  # a clean interpreter per run: no state shared with this one
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        print(f"lorafair compare: {len(pending)} runs to fit, {jobs} at a time; each run's output goes to "
              f"{logs}/METHOD-seedSEED.log")
        running = {}
        for where, run_cfg in pending:
            log = logs / f"{Path(run_cfg.out_dir).relative_to(logs.parent).as_posix().replace('/', '-')}.log"
            running[pool.submit(_fit_logged, run_cfg, log)] = (where, log)
        for future in as_completed(running):
            where, log = running[future]
            error = future.exception()
            if error is None:
                print(f"lorafair compare: {where}: finished in {future.result():.0f} s")
            else:
                failures.append(f"{where}: {error or type(error).__name__} (see {log})")
                print(f"lorafair compare: {where}: failed: {error or type(error).__name__} (see {log})",
                      file=sys.stderr)
    if failures:
        raise UserError(f"compare: {failures[0]}" + (f" ({len(failures) - 1} more runs failed)"
                                                     if len(failures) > 1 else "")
                        + "; the finished runs are kept: fix it and run compare again")


def _is_rank_zero() -> bool:
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def compare(cfg: FitConfig, methods: list[str] | None, seeds: list[int] | None, grid: str | None,
            baseline: str = BASELINE, jobs: int = 1) -> None:
    """Fit every planned run that is not finished yet, `jobs` at a time, then write the report into cfg.out_dir,
    each row against `baseline`."""
    if baseline not in comparable():
        raise UserError(f"--baseline: unknown method {baseline!r}; valid: {', '.join(comparable())}")
    if jobs < 1:
        raise UserError(f"--jobs: {jobs} runs at once; pass 1 or more")
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--jobs: under torchrun the processes already share each run; drop --jobs")
    runs = plan_runs(cfg, methods, seeds, grid)
    lead = _is_rank_zero()
    refuse_shared_folder(cfg.out_dir, "out_dir")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    with hold_folder(cfg.out_dir, "--out_dir") if lead else nullcontext():  # one comparison writes it at a time
        _compare(cfg, runs, lead, baseline, jobs)


def _compare(cfg: FitConfig, runs: list[PlannedRun], lead: bool, baseline: str, jobs: int) -> None:
    from lorafair.fit import fit

    statuses = [run_status(run.cfg.out_dir) for run in runs]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if lead:
        print(f"lorafair compare: {len(runs)} runs in {cfg.out_dir}, {statuses.count('done')} finished earlier")
        key = runs[0].override[0] if runs[0].override else ""
        for method in dict.fromkeys(run.method for run in runs):
            if key.startswith("server.") and (method in BOUNDS or key.removeprefix("server.")
                                              not in method_options(method)):
                print(f"lorafair compare: note: {method} ignores {key}: its runs for each value are the same",
                      file=sys.stderr)
    pending: list[tuple[str, FitConfig]] = []
    for index, (run, status) in enumerate(zip(runs, statuses, strict=True), start=1):
        where = f"[{index}/{len(runs)}] {run.cfg.out_dir}"
        if status == "unreadable" and not distributed:
            continue  # the report names it
        if status == "done" and not distributed:
            changed = config_differences(run.cfg.out_dir, run.cfg)
            if changed:
                print(f"lorafair compare: warning: {where} finished with another config ({'; '.join(changed)}); "
                      "its results are kept: delete the folder to run it again", file=sys.stderr)
            continue
        run_cfg = replace(run.cfg, resume=None if status == "new" and not distributed else "auto")
        if jobs > 1:
            pending.append((where, run_cfg))
            continue
        if lead:
            print(f"lorafair compare: {where}: {'starting' if status == 'new' else 'resuming'}")
        fit(run_cfg)
    if pending:
        fit_in_parallel(pending, jobs, Path(cfg.out_dir) / LOGS_NAME)
    if lead:
        bad = report(cfg.out_dir, skip_bad=True, baseline=baseline)
        if bad:
            raise UserError(f"compare: left out of the report: {bad[0]}; fix it or delete its folder and run compare "
                            f"again" + (f" ({len(bad) - 1} more such runs)" if len(bad) > 1 else ""))
