"""`lorafair COMMAND`: the table of commands (lorafair.commands, one module each) handed to jsonargparse.

Each command's arguments come from jsonargparse: a function taking `cfg: FitConfig` gets `--config FILE_OR_NAME`
and every FitConfig key as a flag (lorafair.config_parse), and its other parameters through
`add_function_arguments`, with their docstrings as help. `--config` takes a path, or the name of a config shipped
with the package (`lorafair configs` lists them).

Every user error (unknown key, wrong type, impossible value, missing dataset) ends as one line on stderr and exit
code 2: lorafair's own checks word theirs, jsonargparse words a parse error (followed by the close match of an
unknown key and the --help to read); tracebacks are kept for bugs.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints, is_typeddict

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from lorafair.commands import compare, configs, data, evaluate, export, fit, flower, lm_eval, predict, report
from lorafair.config import FitConfig
from lorafair.config_hub import resolve_config
from lorafair.config_parse import add_fit_config_arguments, checked_args, fit_config
from lorafair.errors import UserError

COMMANDS: dict[str, Callable[..., None]] = {
    "fit": fit.fit, "flower": flower.flower, "data": data.data, "compare": compare.compare, "report": report.report,
    "configs": configs.configs, "export": export.export, "evaluate": evaluate.evaluate, "predict": predict.predict,
    "lm_eval": lm_eval.lm_eval}
"""The command line: name -> the function it runs."""


def takes_config(function: Callable[..., None]) -> bool:
    return "cfg" in inspect.signature(function).parameters


def build_parser() -> ArgumentParser:
    """The top-level parser, with one subcommand per entry of COMMANDS."""
    parser = ArgumentParser(prog="lorafair", description="Federated LoRA fine-tuning of foundation models.",
                            exit_on_error=False)
    subcommands = parser.add_subcommands()
    for name, function in COMMANDS.items():
        summary = inspect.getdoc(function).splitlines()[0]
        command = ArgumentParser(description=summary, exit_on_error=False)
        if takes_config(function):
            add_fit_config_arguments(command)
        add_own_arguments(command, function)
        subcommands.add_subcommand(name, command, help=summary)
    return parser


def add_own_arguments(parser: ArgumentParser, function: Callable[..., None]) -> None:
    """A command's own parameters as arguments, by jsonargparse (names, types, defaults, positional or required
    flags, docstrings as help), keeping two conventions of lorafair's command line that jsonargparse does not
    have: a list parameter takes several values (--seeds 0 1 2, predict a.png photos/) rather than one YAML list,
    and a bool flag alone means true (--overwrite)."""
    parser.add_function_arguments(function, skip={"cfg"}, as_group=False, as_positional=True)
    hints = get_type_hints(function)
    for action in parser._actions:
        hint = hints.get(action.dest)
        options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
        item = next((get_args(option)[0] for option in options if get_origin(option) is list), None)
        if hint is bool:
            action.nargs, action.const = "?", True
        elif item is not None:  # each value is checked as one item
            action.nargs, action._typehint, action.metavar = "+", item, None


def parse(argv: list[str]) -> tuple[Callable[..., None], dict[str, Any]]:
    """The function `lorafair ARGV` runs, and its keyword arguments (a validated FitConfig as `cfg`)."""
    parser = build_parser()
    values = parser.instantiate(parser.parse_args(checked_args(argv)))
    name = values["subcommand"]
    function, given = COMMANDS[name], values[name]
    kwargs = {param: given[param] for param in inspect.signature(function).parameters if param != "cfg"}
    if takes_config(function):
        kwargs["cfg"] = fit_config(given)
    return function, kwargs


def keys_of(function: Callable[..., None]) -> list[str]:
    """Every key a command takes: FitConfig's keys where it takes `cfg` (a section and its dotted keys), its
    parameters (a TypedDict and its dotted keys)."""
    hints = {name: hint for name, hint in get_type_hints(function).items() if name not in ("cfg", "return")}
    if takes_config(function):
        hints.update(get_type_hints(FitConfig))
    keys = ["config"] if takes_config(function) else []
    for name, hint in hints.items():
        inner = [f.name for f in fields(hint)] if is_dataclass(hint) else list(hint.__annotations__) if (
            is_typeddict(hint)) else []
        keys += [name, *(f"{name}.{key}" for key in inner)]
    return keys


def given_keys(argv: list[str]) -> list[str]:
    """The keys of the flags in argv and of the settings in its --config files, as dotted names."""
    keys, after_config = [], False
    for arg in argv:
        if after_config or arg.startswith("--config="):
            keys += config_keys(arg.removeprefix("--config="))
        elif arg.startswith("--"):
            keys.append(arg[2:].split("=")[0].removesuffix("+"))
        after_config = arg == "--config"
    return keys


def config_keys(name: str) -> list[str]:
    """The dotted keys a config file sets (a section's keys one level down); none if it cannot be read."""
    try:
        settings = yaml.safe_load(resolve_config(name).read_text())  # checked before jsonargparse read it
    except (UserError, OSError, yaml.YAMLError):
        return []
    if not isinstance(settings, dict):
        return []
    return [f"{key}.{sub}" if isinstance(value, dict) else str(key)
            for key, value in settings.items() for sub in (value if isinstance(value, dict) else [None])]


def suggestion(argv: list[str]) -> str:
    """'; unknown key KEY: did you mean --CLOSE?' for the first key in argv (or in its configs) that its command
    does not take and that is close to one it does; else ''."""
    function = COMMANDS.get(argv[0]) if argv else None
    if function is None:
        return ""
    known = keys_of(function)
    for key in given_keys(argv[1:]):
        if key not in known and key not in ("help", "print_config") and not key.endswith(".help"):
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.8)
            if close:
                return f"; unknown key {key}: did you mean {', '.join('--' + match for match in close)}?"
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        function, kwargs = parse(argv)
        function(**kwargs)
        return 0
    except UserError as err:
        print(f"lorafair: error: {err}", file=sys.stderr)
        return 2
    except ArgumentError as err:  # jsonargparse's message, on one line, with the likely key and where to look
        command = f"lorafair {argv[0]}" if argv and argv[0] in COMMANDS else "lorafair"
        message = " ".join(str(err).split()).removesuffix(".")
        print(f"lorafair: error: {message}{suggestion(argv)}; see `{command} --help`", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # checkpoints are atomic: the last complete round is on disk
        print("lorafair: interrupted; every finished round's checkpoint is kept, and the same command continues the "
              "run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
