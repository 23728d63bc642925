"""Files replaced whole: a reader sees the old content or the new one, never a mix, and a write refused for want of
space is one line that says nothing was put in place.

`replacing(path)` is the one way lorafair writes a file atomically: a temporary file of a unique name beside `path`,
flushed and synced, then renamed over it. results.json, config.yaml, the run folder's marker and the checkpoints are
all written through it.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from lorafair.errors import UserError

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextmanager
def replacing(path: Path, before_rename: Callable[[], None] | None = None) -> Iterator[BinaryIO]:
    """A file to write the new content of `path` into; when the block ends, the file is synced and renamed over
    `path`. `before_rename` runs once the file is complete and synced (a fault-injection point for tests). If the
    block raises, `path` is left as it was."""
    with temporary_beside(path) as (handle, temporary):
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(temporary, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see either the old or the new content, never a mix."""
    with replacing(path) as handle:
        handle.write(text.encode())


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    write_text_atomic(path, yaml.safe_dump(dict(data), sort_keys=False))


@contextmanager
def temporary_beside(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A new file of a unique name beside `path` (".NAME.XXXXXXXX.tmp", so two writers of one file never share a
    temporary), opened for writing with the permissions a plain `open` would give; removed again if the block
    raises before renaming it."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would make results.json private to its owner
        with os.fdopen(fd, "wb") as handle:
            yield handle, temporary
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        if is_disk_full(err):
            raise UserError(disk_full_message(path)) from err
        raise


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` is, or was raised while handling, a write refused for want of space or quota (torch.save
    reports one as a RuntimeError whose context is the OSError)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL:
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_message(path: Path) -> str:
    return (f"no space left on the device to write {path}; nothing was put in its place (an earlier version is "
            f"kept): free space, then run the same command again, which resumes from the last complete checkpoint")


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
