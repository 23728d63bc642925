"""Configs by name: the YAML files shipped with the package (lorafair/configs, read through importlib.resources;
the repository's configs/ is a link to it, so there is one copy), found by path or by name."""

from __future__ import annotations

import difflib
from importlib.resources import files
from pathlib import Path

from lorafair.errors import UserError


def config_root() -> Path:
    """The shipped configs: the package data lorafair/configs."""
    return Path(files("lorafair") / "configs")


def list_configs() -> list[str]:
    """Every shipped config's name, relative to the config folder without .yaml (paper/ ones as paper/NAME)."""
    root = config_root()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))


def resolve_config(name: str) -> Path:
    """An existing path as it is; else the shipped config of that name (with or without .yaml, configs/ prefix
    allowed); else one UserError listing the close matches."""
    path = Path(name)
    if path.is_file():
        return path
    key = name.removesuffix(".yaml").removeprefix("configs/")
    shipped = config_root() / f"{key}.yaml"
    if shipped.is_file():
        return shipped
    names = list_configs()
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "`lorafair configs` lists the shipped ones"
    raise UserError(f"--config: {name} is neither a file nor a shipped config; {hint}")
