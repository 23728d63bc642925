"""No process outlives the one that started it."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(*_: object) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a rank whose torchrun agent was killed, a data-loader
    or cache-building worker whose rank was), so no process outlives the job. Usable as a DataLoader worker_init_fn;
    elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
