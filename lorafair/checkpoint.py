"""Per-round checkpoints that survive a kill at any moment, and the guard against resuming a different run.

A checkpoint is written to a temporary file, fsynced, then renamed over its final name, so a file named
`round_NNNNN.ckpt` is always complete; the previous one is deleted only after the new one exists. Loading uses
`torch.load(weights_only=True)`: a checkpoint holds tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lorafair.errors import UserError

_NAME = re.compile(r"round_(\d+)\.ckpt")

RUN_ONLY_KEYS = frozenset({"out_dir", "resume", "accelerator", "precision", "num_nodes", "cpu_threads",
                           "federation.rounds", "federation.eval_every", "data.num_workers", "data.eval_batch_size"})
"""Settings free to change on resume: how long a run lasts and how it executes (accelerator and precision change
the numerics a little, not the experiment)."""


def checkpoint_path(directory: Path, round_index: int) -> Path:
    return directory / f"round_{round_index:05d}.ckpt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest round first (temporary files are ignored)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def save_checkpoint(directory: Path, round_index: int, state: Mapping[str, Any], keep: int = 2,
                    before_rename: Callable[[], None] | None = None) -> Path:
    """Write `state` as the checkpoint of `round_index` atomically and keep only the newest `keep` checkpoints.

    `before_rename` runs once the temporary file is complete and synced (a fault-injection point for tests).
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, round_index)
    temporary = final.with_name(final.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(dict(state), handle)
        handle.flush()
        os.fsync(handle.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(temporary, final)
    _fsync_directory(directory)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink()
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint on the CPU; a truncated or foreign file raises UserError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
                        ) from err


def load_latest(directory: Path, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint in `directory` (falling back over unreadable ones, with a warning), or None."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except UserError as err:
            warn(f"{err}; falling back to the previous checkpoint")
    return None


def trajectory_identity(flat_config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that determine a run's results, from a flat {dotted.key: value} config."""
    return {key: value for key, value in flat_config.items() if key not in RUN_ONLY_KEYS}


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: saved -> current' for every trajectory setting that differs between a checkpoint and this run."""
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)]


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
