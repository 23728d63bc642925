"""The settings of a run from command-line arguments, as `lorafair fit` takes them: `--config FILE_OR_NAME` and
every FitConfig key as a flag (`--federation.rounds 3`), parsed by jsonargparse with the field docstrings as help.

The commands (lorafair.cli) and the Flower apps (a deployed run's `config` and `args`) both read settings here.
Every `--config` is resolved (a path, or a shipped config's name) and checked as a file before jsonargparse reads
it, and every other value is held to the same size and alias limits, since jsonargparse parses values as YAML too
(lorafair.config_file).
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from lorafair.config import FitConfig
from lorafair.config_file import check_config_file, check_flag_value
from lorafair.config_hub import resolve_config

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help text

CONFIG_HELP = "YAML config: a path, or a shipped config's name (lorafair configs); later flags override it."


def add_fit_config_arguments(parser: ArgumentParser) -> None:
    """Add --config and every FitConfig key as a flag to `parser`."""
    parser.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
    parser.add_class_arguments(FitConfig, as_group=False)


def fit_config(values: Any) -> FitConfig:
    """The validated FitConfig of instantiated parse results holding FitConfig's keys (other keys are left)."""
    cfg = FitConfig(**{f.name: values[f.name] for f in fields(FitConfig)})
    cfg.validate()
    return cfg


def parse_fit_config(argv: list[str]) -> FitConfig:
    """The validated FitConfig of `lorafair fit ARGV`."""
    parser = ArgumentParser(prog="lorafair fit", exit_on_error=False)
    add_fit_config_arguments(parser)
    return fit_config(parser.instantiate(parser.parse_args(checked_args(argv))))


def config_sections() -> list[str]:
    """FitConfig's sections (model, lora, data, ...), which a config file must give as mappings."""
    return [name for name, hint in get_type_hints(FitConfig).items() if is_dataclass(hint)]


def checked_args(argv: list[str]) -> list[str]:
    """argv with the value of every --config resolved to a file (a path as it is, a shipped config's name to its
    packaged file), each file checked before jsonargparse reads it, and every other value held to the same size
    and alias limits; a UserError names the first that is not."""
    sections = config_sections()
    resolved, after_config, flag = [], False, "a value"
    for arg in argv:
        if after_config:
            arg = str(checked_config(arg, sections))
        elif arg.startswith("--config="):
            arg = f"--config={checked_config(arg.split('=', 1)[1], sections)}"
        elif arg.startswith("--") and "=" in arg:
            check_flag_value(arg.split("=", 1)[0], arg.split("=", 1)[1])
        else:
            check_flag_value(flag, arg)
        after_config = arg == "--config"
        flag = arg if arg.startswith("--") else "a value"
        resolved.append(arg)
    return resolved


def checked_config(name: str, sections: list[str]) -> Path:
    """The file of a --config value (a path or a shipped config's name), checked to be a small YAML mapping."""
    path = resolve_config(name)
    check_config_file(path, sections)
    return path
