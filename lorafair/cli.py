"""`lorafair COMMAND`: a table of plain typed functions, each handed to jsonargparse with the settings of a run.

A command whose first parameter is `cfg: FitConfig` takes `--config FILE_OR_NAME` and every FitConfig key as flags
(`--federation.rounds 3`); its other parameters become arguments of their own, documented by its docstring:
positional without a default, `--name` flags with one, required `--name` flags when keyword-only without one. A list
takes several values (`--seeds 0 1 2`), a bool flag alone means true (`--overwrite`), and `Settings` takes the data
section's keys as `--data.KEY` flags and receives only those given. `--config` takes a path, or the name of a config
shipped with the package (`lorafair configs` lists them).

Every user error (unknown key, wrong type, impossible value, missing dataset) ends as one line on stderr and
exit code 2; tracebacks are kept for bugs.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

from docstring_parser import parse as parse_docstring
from jsonargparse import ArgumentParser, Namespace

from lorafair.config import DataConfig, FitConfig
from lorafair.config_hub import list_configs
from lorafair.config_parse import add_fit_config_arguments, checked_args, fit_config
from lorafair.errors import UserError

Settings = Annotated[dict[str, Any], DataConfig]
"""Data settings given as --data.KEY flags, only those typed on the command line (they override a run's own)."""


def fit(cfg: FitConfig) -> None:
    """Run one federated fine-tuning job."""
    from lorafair.federated.loop import fit as run_fit

    run_fit(cfg)


def flower(cfg: FitConfig) -> None:
    """Run the job of `fit` on Flower's simulation engine, one SuperNode per client (pip install lorafair[flower])."""
    try:
        from lorafair.flower.app import simulate
    except ImportError as err:
        raise UserError(f"lorafair flower needs Flower ({err}); install it with pip install lorafair[flower]") from err
    simulate(cfg)


def data(cfg: FitConfig, plot: Path | None = None, build_cache: bool = False) -> None:
    """Build the datasets and client partition of a config and print one row per client and per domain.

    Args:
        plot: Also write a client x class heatmap PNG here.
        build_cache: Also build (or fully check) the decode-once image cache of every split (data.cache), e.g.
            ahead of a multi-node job.
    """
    from lorafair.data.summary import summarize

    summarize(cfg, plot=plot, build_cache=build_cache)


def compare(cfg: FitConfig, methods: str | None = None, seeds: list[int] | None = None, grid: str | None = None,
            baseline: str = "fedit", jobs: int = 1) -> None:
    """Run several methods (seeds, grid points) with everything else identical and write paper-style tables and plots.

    Args:
        methods: Comma-separated methods to compare, and the bounds centralized and local (default: every method
            and both bounds).
        seeds: Seeds to repeat every run with, e.g. --seeds 0 1 2 (default: the config's seed).
        grid: Sweep one key, e.g. server.lam=0,0.001,0.01 or lora.r=4,8,16.
        baseline: The method every other is compared with (paired differences and their 95% intervals).
        jobs: Runs at once on this machine, each in a process of its own, its output in OUT_DIR/logs/ (e.g. one
            per core for a small model with cpu_threads 1); 1 runs them one after another in this process.
    """
    from lorafair.reporting.compare import compare as run_compare

    chosen = None if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    run_compare(cfg, methods=chosen, seeds=seeds, grid=grid, baseline=baseline, jobs=jobs)


def report(dir: Path, baseline: str = "fedit") -> None:
    """Rebuild comparison tables and plots from the run folders under a compare output folder.

    Args:
        dir: A compare output folder.
        baseline: The method every other is compared with (paired differences and their 95% intervals).
        jobs: Runs at once on this machine, each in a process of its own, its output in OUT_DIR/logs/ (e.g. one
            per core for a small model with cpu_threads 1); 1 runs them one after another in this process.
    """
    from lorafair.reporting.report import report as run_report

    run_report(dir, baseline=baseline)


def lm_eval(*, run: Path, tasks: list[str], include_path: Path | None = None, batch_size: int = 8,
            limit: int | None = None, allow_code_execution: bool = False) -> None:
    """Score a run's global language model with lm-evaluation-harness (lm-eval, in the text extra).

    Args:
        run: A run folder of a causal language model (its newest checkpoint is used).
        tasks: lm-eval task names, e.g. --tasks gsm8k mmlu, or tasks defined under --include_path.
        include_path: A folder of lm-eval task YAML files of your own (e.g. over a local JSONL file).
        batch_size: Examples per forward pass.
        limit: Score at most this many examples per task.
        allow_code_execution: Allow tasks that run the code the model writes (HumanEval, MBPP); off by default.
    """
    from lorafair.text.harness import score

    results = score(run, tasks, include_path, batch_size, limit, allow_code_execution)
    for task, metrics in results.items():
        shown = ", ".join(f"{name}: {value:.4f}" for name, value in metrics.items() if isinstance(value, float))
        print(f"{task}: {shown}")


def configs() -> None:
    """List the configs shipped with the package, one name per line (pass one to --config)."""
    print("\n".join(list_configs()))


def export(*, run: Path, round: int | None = None, out: Path | None = None, overwrite: bool = False) -> None:
    """Write a run's global model as a peft adapter and timm (or transformers) models (run_dir/final at the end of
    fit).

    Args:
        run: A run folder (its newest checkpoint is used).
        round: Export this round's checkpoint instead (a run keeps its newest two).
        out: Export folder (default: RUN/final).
        overwrite: Replace an existing export folder.
    """
    from lorafair.export import export_run

    export_run(run, round, out, overwrite)


def evaluate(*, run: Path, round: int | None = None, data: Settings | None = None) -> None:
    """Print the top-1 per domain of a run's global image model on its own test splits, or on other data.

    Args:
        run: A run folder (its newest checkpoint is used) or a folder `lorafair export` wrote.
        round: Score this round's checkpoint instead.
        data: Data settings overriding the run's (only those given), e.g. --data.name folders --data.root DIR.
    """
    from lorafair.inference import evaluate_run

    evaluate_run(run, round, data)


def predict(images: list[Path], *, run: Path, round: int | None = None, top_k: int = 5, output: Path | None = None,
            batch_size: int = 64) -> None:
    """Print the top-k classes with probabilities of each image, classified by a run's global model.

    Args:
        images: Image files or folders (searched recursively).
        run: A run folder (its newest checkpoint is used) or a folder `lorafair export` wrote.
        round: Use this round's checkpoint instead.
        top_k: Classes listed per image.
        output: Also write CSV rows (image, rank, class, probability) here.
        batch_size: Images per forward pass.
    """
    from lorafair.inference import predict as run_predict

    run_predict(run, images, round, top_k, output, batch_size)


COMMANDS: dict[str, Callable[..., None]] = {"fit": fit, "flower": flower, "data": data, "compare": compare,
                                            "report": report, "configs": configs, "export": export,
                                            "evaluate": evaluate, "predict": predict, "lm_eval": lm_eval}
"""The command line: name -> the function it runs."""


def _takes_config(function: Callable[..., None]) -> bool:
    return next(iter(inspect.signature(function).parameters), None) == "cfg"


def command_parser(function: Callable[..., None]) -> ArgumentParser:
    """The parser of one command: FitConfig's keys (and --config) where the function takes `cfg`, then its own
    parameters."""
    summary = inspect.getdoc(function).splitlines()[0]
    parser = ArgumentParser(description=summary, exit_on_error=False)
    if _takes_config(function):
        add_fit_config_arguments(parser)
    docs = {param.arg_name: param.description for param in parse_docstring(inspect.getdoc(function)).params}
    hints = get_type_hints(function, include_extras=True)
    for name, param in inspect.signature(function).parameters.items():
        if name == "cfg":
            continue
        section = _settings_section(hints[name])
        if section is not None:
            parser.add_class_arguments(section, name, help=docs.get(name))
            continue
        item = _list_item(hints[name])
        kind = {"type": item, "nargs": "+"} if item is not None else {"type": hints[name]}
        if hints[name] is bool:
            kind.update(nargs="?", const=True)  # --overwrite alone means true
        if param.default is not inspect.Parameter.empty:
            parser.add_argument(f"--{name}", default=param.default, help=docs.get(name), **kind)
        elif param.kind is inspect.Parameter.KEYWORD_ONLY:
            parser.add_argument(f"--{name}", required=True, help=docs.get(name), **kind)
        else:
            parser.add_argument(name, help=docs.get(name), **kind)
    return parser


def _list_item(hint: Any) -> Any:
    """X for a hint list[X] or list[X] | None (taken as several values), else None."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    return next((get_args(option)[0] for option in options if get_origin(option) is list), None)


def _settings_section(hint: Any) -> type | None:
    """The config section of a `Settings` hint (or `Settings | None`), else None."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    return next((option.__metadata__[0] for option in options if get_origin(option) is Annotated), None)


def build_parser() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """The top-level parser and each command's parser."""
    parser = ArgumentParser(prog="lorafair", description="Federated LoRA fine-tuning of foundation models.",
                            exit_on_error=False)
    subcommands = parser.add_subcommands(dest="command")
    parsers = {}
    for name, function in COMMANDS.items():
        parsers[name] = command_parser(function)
        subcommands.add_subcommand(name, parsers[name], help=inspect.getdoc(function).splitlines()[0])
    return parser, parsers


def parse(argv: list[str]) -> tuple[Callable[..., None], dict[str, Any]]:
    """The function `lorafair ARGV` runs, and its keyword arguments (a validated FitConfig as `cfg`)."""
    parser, parsers = build_parser()
    args = parser.parse_args(checked_args(argv))
    function, namespace = COMMANDS[args.command], args[args.command]
    hints = get_type_hints(function, include_extras=True)
    kwargs = {name: given_settings(argv, name, namespace[name]) if _settings_section(hints[name]) else namespace[name]
              for name in inspect.signature(function).parameters if name != "cfg"}
    if _takes_config(function):
        kwargs["cfg"] = fit_config(parsers[args.command].instantiate(namespace))
    return function, kwargs


def given_settings(argv: list[str], section: str, parsed: Namespace) -> dict[str, Any]:
    """The --SECTION.KEY settings typed in argv, with their parsed values."""
    keys = {arg[len(section) + 3:].split("=")[0] for arg in argv if arg.startswith(f"--{section}.")}
    return {key: parsed[key] for key in sorted(keys) if key in parsed}


def _known_keys() -> list[str]:
    """Every flag name of every command (FitConfig's dotted keys and the commands' own parameters)."""
    keys = []
    for name, hint in get_type_hints(FitConfig).items():
        keys += [f"{name}.{f.name}" for f in fields(hint)] if is_dataclass(hint) else [name]
    for function in COMMANDS.values():
        keys += [name for name in inspect.signature(function).parameters if name != "cfg"]
    return sorted(set(keys))


def explain_parse_error(message: str, known_keys: list[str]) -> str:
    """Rewrite jsonargparse's messages into one line naming the key, the valid values and a likely fix."""
    message = " ".join(message.split())
    unknown = re.search(r"(?:unrecognized arguments: --|does not accept option ')([\w.]+)", message)
    if unknown:
        key = unknown.group(1)
        close = difflib.get_close_matches(key, known_keys, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `lorafair fit --help` for the valid keys"
        return f"unknown config key '{key}'{hint}"
    required = re.search(r"the following arguments are required: (\w+)\.(\w+)", message)
    if required and required.group(1) in COMMANDS:
        command, name = required.groups()
        param = inspect.signature(COMMANDS[command]).parameters.get(name)
        flag = "--" if param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY else ""
        return f"lorafair {command} needs {flag}{name}; see `lorafair {command} --help`"
    literal = re.search(r'Parser key "([\w.]+)": Expected a typing.Literal\[(.*?)\]\. Got value: (.*)', message)
    if literal:
        key, choices, got = literal.groups()
        return f"{key}: {got!r} is not valid; choose one of {choices.replace(chr(39), '')}"
    typed = re.search(r"Parser key \"([\w.]+)\": Expected a <class '(\w+)'>\. Got value: (.*)", message)
    if typed:
        key, kind, got = typed.groups()
        return f"{key}: expected a value of type {kind}, got {got!r}"
    return message


def main(argv: list[str] | None = None) -> int:
    try:
        function, kwargs = parse(sys.argv[1:] if argv is None else argv)
        function(**kwargs)
        return 0
    except UserError as err:
        print(f"lorafair: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # checkpoints are atomic: the last complete round is on disk
        print("lorafair: interrupted; every finished round's checkpoint is kept, and the same command continues the "
              "run", file=sys.stderr)
        return 130
    except Exception as err:
        if type(err).__name__ == "ArgumentError" or type(err).__module__.startswith("jsonargparse"):
            print(f"lorafair: error: {explain_parse_error(str(err), _known_keys())}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
