"""Checks a YAML config file before jsonargparse reads it, so a hostile or malformed file costs one line, not memory.

PyYAML builds an alias as a shared object, so nine nested anchors of nine references each load as a few kilobytes,
yet anything that walks the result (jsonargparse does) visits 9**9 values. `yaml.compose` returns the node graph
without building values; its expanded size is counted here, memoised per node, before anything is constructed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from lorafair.errors import UserError

MAX_BYTES = 1 << 20
"""A config is a few kilobytes; a file over a mebibyte is not one."""
MAX_NODES = 100_000
"""Expanded values (every alias counted as a full copy); the largest shipped config has a few hundred."""


def check_config_file(path: str | Path, sections: Iterable[str]) -> None:
    """Raise a UserError naming `path` unless it is a small YAML mapping whose `sections` keys hold mappings."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UserError(f"config {path}: {size} bytes is over the {MAX_BYTES} byte limit of a config file; "
                        f"pass a lorafair config (`lorafair configs` lists the shipped ones)")
    try:
        root = yaml.compose(path.read_bytes().decode("utf-8"), Loader=yaml.SafeLoader)
    except UnicodeDecodeError as err:
        raise UserError(f"config {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {' '.join(str(err).split())}") from err
    except RecursionError as err:
        raise UserError(f"config {path} is nested too deeply to be a lorafair config") from err
    try:
        nodes = expanded_size(root) if root is not None else 0
    except RecursionError as err:
        raise UserError(f"config {path} is nested too deeply to be a lorafair config") from err
    if nodes > MAX_NODES:
        raise UserError(f"config {path} expands to {nodes} values (aliases counted in full), over the limit of "
                        f"{MAX_NODES}; it is not a lorafair config (an alias bomb?)")
    if not isinstance(root, yaml.MappingNode):
        got = "an empty file" if root is None else f"a {_kind(root)}"
        raise UserError(f"config {path}: expected a mapping of settings at the top level (e.g. 'federation:' then "
                        f"'  rounds: 50'), got {got}")
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value in sections and not isinstance(value, yaml.MappingNode):
            raise UserError(f"config {path}: {key.value}: expected a mapping of {key.value}.* settings (e.g. "
                            f"'{key.value}:' then indented 'key: value' lines), got a {_kind(value)} "
                            f"(line {value.start_mark.line + 1})")


def check_flag_value(flag: str, text: str) -> None:
    """Raise a UserError where a command-line value, which jsonargparse parses as YAML, is over the size or alias
    limits of a config file; a value that is not valid YAML is left for the parser to explain."""
    if len(text.encode("utf-8", "surrogateescape")) > MAX_BYTES:
        raise UserError(f"{flag}: a value of {len(text)} characters is over the {MAX_BYTES} byte limit of a setting")
    if "&" not in text and "*" not in text and "<<" not in text:
        return  # without anchors or aliases the expansion is the text itself, already bounded
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        nodes = expanded_size(root) if root is not None else 0
    except yaml.YAMLError:
        return
    except RecursionError as err:
        raise UserError(f"{flag}: the value is nested too deeply to be a setting") from err
    if nodes > MAX_NODES:
        raise UserError(f"{flag}: the value expands to {nodes} values (aliases counted in full), over the limit of "
                        f"{MAX_NODES} (an alias bomb?)")


def expanded_size(root: yaml.Node) -> int:
    """Number of nodes the graph would have with every alias expanded, computed in time linear in its real size."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 1  # a recursive alias counts once instead of looping
            if isinstance(node, yaml.SequenceNode):
                sizes[id(node)] = 1 + sum(size(child) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                sizes[id(node)] = 1 + sum(size(key) + size(value) for key, value in node.value)
        return sizes[id(node)]

    return size(root)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return f"value {node.value!r}"
    return "list" if isinstance(node, yaml.SequenceNode) else "mapping"
