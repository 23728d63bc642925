"""Fault injection for the reliability tests, read from environment variables; unset, they cost nothing.

LORAFAIR_FAIL_AT=ROUND:PHASE (or ROUND:PHASE:RANK to kill one rank only) kills this process with SIGKILL at a named
point of a round, as a pre-emption would: nothing gets a chance to clean up, exactly the situation the checkpoints
must survive. It fires once per job: under torchrun only in the first attempt (TORCHELASTIC_RESTART_COUNT unset or
0), so the processes torchrun restarts run through and resume.

LORAFAIR_FAIL_SIGNAL=SIGSTOP (any signal name; default SIGKILL) sends that signal instead, e.g. to freeze a rank the
way a dead node without a closed socket would.

LORAFAIR_POISON=ROUND:CLIENT[,ROUND:CLIENT...] turns the update of that client in that round into NaN, as a
diverged client's would be, so the server's dropping of bad updates can be tested end to end.

LORAFAIR_CLIENT_ERROR=ROUND:CLIENT[,...] makes that client's Flower ClientApp raise in that round, as a node that
fails mid-round: Flower turns it into an error reply and the round goes on with the others. Round 0 is the gradient
exchange before round 1 (Fed-SB), which needs every client: the run stops.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "LORAFAIR_FAIL_AT"
SIGNAL_ENV_VAR = "LORAFAIR_FAIL_SIGNAL"
POISON_ENV_VAR = "LORAFAIR_POISON"
CLIENT_ERROR_ENV_VAR = "LORAFAIR_CLIENT_ERROR"
PHASES = ("train", "gather", "aggregate", "eval", "checkpoint")
"""Where a round can be interrupted: during local training, before the exchange between ranks, the aggregation, the
evaluation, and with the new checkpoint written but not yet renamed into place."""


def maybe_fail(round_index: int, phase: str) -> None:
    """Kill (or signal, LORAFAIR_FAIL_SIGNAL) this process if LORAFAIR_FAIL_AT names this round, phase (and this
    process's RANK, as torchrun sets it; 0 without torchrun), in a job's first attempt."""
    target = os.environ.get(ENV_VAR)
    if not target:
        return
    parts = target.split(":")
    if len(parts) not in (2, 3) or parts[1] not in PHASES:
        raise ValueError(f"{ENV_VAR}={target!r}: expected ROUND:PHASE[:RANK] with PHASE one of {', '.join(PHASES)}")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank = int(os.environ.get("RANK", "0"))
    if int(parts[0]) == round_index and parts[1] == phase and (len(parts) == 2 or int(parts[2]) == rank):
        os.kill(os.getpid(), getattr(signal, os.environ.get(SIGNAL_ENV_VAR, "SIGKILL")))


def is_poisoned(round_index: int, client_id: int) -> bool:
    """Whether LORAFAIR_POISON names this client in this round."""
    return _names(POISON_ENV_VAR, round_index, client_id)


def maybe_raise_in_client(round_index: int, client_id: int) -> None:
    """Raise if LORAFAIR_CLIENT_ERROR names this client in this round."""
    if _names(CLIENT_ERROR_ENV_VAR, round_index, client_id):
        raise RuntimeError(f"{CLIENT_ERROR_ENV_VAR}: client {client_id} fails in round {round_index}")


def _names(env_var: str, round_index: int, client_id: int) -> bool:
    target = os.environ.get(env_var)
    if not target:
        return False
    pairs = [item.split(":") for item in target.split(",")]
    if not all(len(pair) == 2 and all(part.strip().isdigit() for part in pair) for pair in pairs):
        raise ValueError(f"{env_var}={target!r}: expected ROUND:CLIENT[,ROUND:CLIENT...]")
    return [round_index, client_id] in [[int(part) for part in pair] for pair in pairs]
