"""`lorafair {fit,data,compare,report}`: jsonargparse parsers over the typed settings of `lorafair.config`.

Every user error (unknown key, wrong type, impossible value, missing dataset) ends as one line on stderr and
exit code 2; tracebacks are kept for bugs.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import fields
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from lorafair.config import FitConfig
from lorafair.errors import UserError

_FIT_KEYS = {f.name for f in fields(FitConfig)}
set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help text


def _with_fit_config(parser: ArgumentParser) -> ArgumentParser:
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (configs/); later flags override it.")
    parser.add_class_arguments(FitConfig, as_group=False)
    return parser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lorafair", description="Federated LoRA fine-tuning of vision foundation models.",
                            exit_on_error=False)
    commands = parser.add_subcommands(dest="command")

    fit = _with_fit_config(ArgumentParser(description="Run one federated fine-tuning job.", exit_on_error=False))
    commands.add_subcommand("fit", fit, help="Run one federated fine-tuning job.")

    data = _with_fit_config(ArgumentParser(description="Build the datasets and client partition of a config and "
                                           "print one row per client and per domain.", exit_on_error=False))
    data.add_argument("--plot", type=Path | None, default=None, help="Also write a client x class heatmap PNG here.")
    commands.add_subcommand("data", data, help="Show the datasets and client partition of a config.")

    compare = _with_fit_config(ArgumentParser(description="Run several methods (seeds, grid points) with everything "
                                              "else identical and write paper-style tables and plots.",
                                              exit_on_error=False))
    compare.add_argument("--methods", type=str, default="fedit,ffa_lora,flora,flexlora,lorafair,florana",
                         help="Comma-separated methods to compare.")
    compare.add_argument("--seeds", type=int, nargs="+", default=None,
                         help="Seeds to repeat every run with, e.g. --seeds 0 1 2 (default: the config's seed).")
    compare.add_argument("--grid", type=str | None, default=None,
                         help="Sweep one key, e.g. server.lam=0,0.001,0.01 or lora.r=4,8,16.")
    commands.add_subcommand("compare", compare, help="Compare methods on one config.")

    report = ArgumentParser(description="Rebuild comparison tables and plots from existing run folders.",
                            exit_on_error=False)
    report.add_argument("dir", type=Path, help="A compare output folder.")
    commands.add_subcommand("report", report, help="Rebuild tables and plots from run folders.")
    return parser


def fit_config(parser: ArgumentParser, namespace: Namespace) -> FitConfig:
    """Turn a parsed namespace of a fit-like command into a validated FitConfig."""
    values = parser.instantiate(namespace)
    cfg = FitConfig(**{k: values[k] for k in _FIT_KEYS})
    cfg.validate()
    return cfg


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command
    sub = args[command]
    sub_parser = parser._subcommands_action._name_parser_map[command]
    if command == "report":
        from lorafair.reporting.report import report

        report(sub.dir)
        return 0
    cfg = fit_config(sub_parser, sub)
    if command == "fit":
        from lorafair.federated.loop import fit

        fit(cfg)
    elif command == "data":
        from lorafair.data.summary import summarize

        summarize(cfg, plot=sub.plot)
    elif command == "compare":
        from lorafair.reporting.compare import compare

        compare(cfg, methods=[m.strip() for m in sub.methods.split(",") if m.strip()], seeds=sub.seeds,
                grid=sub.grid)
    return 0


def _known_keys(parser: ArgumentParser) -> list[str]:
    keys = []
    for sub in parser._subcommands_action._name_parser_map.values():
        keys += [a.dest for a in sub._actions if a.dest not in ("help", "config")]
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
        return _run(argv)
    except UserError as err:
        print(f"lorafair: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if type(err).__name__ == "ArgumentError" or type(err).__module__.startswith("jsonargparse"):
            print(f"lorafair: error: {explain_parse_error(str(err), _known_keys(build_parser()))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
