"""Fault injection for the resume tests: kill this process at a named point of a round, as a pre-emption would.

Set LORAFAIR_FAIL_AT=ROUND:PHASE (or ROUND:PHASE:RANK to kill one rank only). The process sends itself SIGKILL, so
nothing gets a chance to clean up: exactly the situation the checkpoints must survive. Unset, it costs nothing.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "LORAFAIR_FAIL_AT"
PHASES = ("train", "gather", "aggregate", "eval", "checkpoint")
"""Where a round can be interrupted: during local training, the gather, the aggregation, the evaluation, and with
the new checkpoint written but not yet renamed into place."""


def maybe_fail(round_index: int, phase: str, rank: int) -> None:
    """Kill this process if LORAFAIR_FAIL_AT names this round, phase (and rank)."""
    target = os.environ.get(ENV_VAR)
    if not target:
        return
    parts = target.split(":")
    if len(parts) not in (2, 3) or parts[1] not in PHASES:
        raise ValueError(f"{ENV_VAR}={target!r}: expected ROUND:PHASE[:RANK] with PHASE one of {', '.join(PHASES)}")
    if int(parts[0]) == round_index and parts[1] == phase and (len(parts) == 2 or int(parts[2]) == rank):
        os.kill(os.getpid(), signal.SIGKILL)
