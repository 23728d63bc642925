"""`lorafair evaluate`."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TypedDict, get_type_hints

from docstring_parser import parse_from_object

from lorafair.config import DataConfig


def _data_settings() -> type:
    """DataConfig's keys as a TypedDict whose keys are all optional, documented by DataConfig's field docstrings:
    jsonargparse takes them as --data.KEY flags (listed by --data.help) and gives only those typed."""
    hints = get_type_hints(DataConfig)
    docs = {param.arg_name: " ".join((param.description or "").split())
            for param in parse_from_object(DataConfig).params}
    settings = TypedDict("DataSettings", {f.name: hints[f.name] for f in fields(DataConfig)}, total=False)
    settings.__doc__ = "Data settings overriding the run's own.\n\nArgs:\n" + "\n".join(
        f"    {f.name}: {docs.get(f.name, '')}" for f in fields(DataConfig))
    return settings


DataSettings = _data_settings()
NO_SETTINGS: DataSettings = {}
"""No data setting given: the run's own data."""


def evaluate(*, run: Path, round: int | None = None, data: DataSettings = NO_SETTINGS) -> None:
    """Print the top-1 per domain of a run's global image model on its own test splits, or on other data.

    Args:
        run: A run folder (its newest checkpoint is used) or a folder `lorafair export` wrote.
        round: Score this round's checkpoint instead.
        data: Data settings overriding the run's (only those given), e.g. --data.name folders --data.root DIR;
            --data.help lists them.
    """
    from lorafair.inference import evaluate_run

    evaluate_run(run, round, dict(data))
