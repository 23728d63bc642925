"""Per-round checkpoints that survive a kill at any moment, and the guard against resuming a different run.

A checkpoint is written to a temporary file of a unique name, fsynced, then renamed over its final name, so a file named
`round_NNNNN.ckpt` is always complete; the previous one is deleted only after the new one exists. Each file carries a
SHA-256 of its content, so a file damaged later (a flipped bit, a copy cut short) is told apart from a good one: torch's
zip container alone does not notice changed tensor bytes. Loading uses `torch.load(weights_only=True)`: a checkpoint
holds tensors, numbers, strings, lists and dicts only, and a file with any other pickled object is refused.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafair.config import FitConfig
from lorafair.errors import UserError
from lorafair.federated.run_folder import (
    checkpoint_dir,
    current_round_record,
    is_finished,
    read_results,
    results_path,
)
from lorafair.federated.state import GlobalState, OwnState, ResumeState
from lorafair.files import fsync_directory, replacing
from lorafair.keys import (
    is_by_rank,
    nest_pairs,
    pack,
    pack_by_rank,
    pack_clients,
    pack_pairs,
    unnest_pairs,
    unpack,
    unpack_clients,
)
from lorafair.models.build import state_shapes

CHECKPOINT_KEYS = frozenset({"round", "identity", "results", "lora", "extra", "base"})

CHECKSUM_KEY = "sha256"
"""The entry of a checkpoint file holding content_digest of everything else in it."""

_NAME = re.compile(r"round_(\d+)\.ckpt")

def checkpoint_path(directory: Path, round_index: int) -> Path:
    return directory / f"round_{round_index:05d}.ckpt"


def kept_rounds(directory: Path) -> dict[int, Path]:
    """Round -> its complete checkpoint in `directory`, oldest round first (temporary files are ignored)."""
    if not directory.is_dir():
        return {}
    return dict(sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest round first (temporary files are ignored)."""
    return list(kept_rounds(directory).values())


def save_checkpoint(directory: Path, round_index: int, state: Mapping[str, Any], keep: int = 2,
                    before_rename: Callable[[], None] | None = None) -> Path:
    """Write `state` as the checkpoint of `round_index` atomically and keep only the newest `keep` checkpoints.

    The file holds `state` plus its CHECKSUM_KEY. `before_rename` runs once the temporary file is complete and synced
    (a fault-injection point for tests).
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, round_index)
    with replacing(final, before_rename) as handle:
        torch.save({**state, CHECKSUM_KEY: content_digest(state)}, handle)
    fsync_directory(directory)
    for stale in directory.glob(".round_*.ckpt.*.tmp"):  # left by a killed write (one writer: the run folder's lock)
        stale.unlink(missing_ok=True)
    # checkpoints of later rounds belong to a run this one branched off (resumed from an older file): drop them
    for old in [path for path in list_checkpoints(directory) if path.name > final.name]:
        old.unlink()
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink()
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint on the CPU and check its checksum (removed from the answer).

    A truncated, corrupt or unsafe file raises UserError naming it. A file without a checksum is returned as it is:
    the caller decides whether it is a lorafair checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise UserError(f"checkpoint {path} cannot be read (UnpicklingError: {' '.join(str(err).split())[:200]})"
                            ) from err
        raise UserError(f"checkpoint {path} holds Python objects other than tensors and plain values; lorafair loads "
                        f"checkpoints with weights_only=True and refuses it (pass a checkpoint lorafair wrote)"
                        ) from err
    except Exception as err:
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
                        ) from err
    if isinstance(state, dict) and CHECKSUM_KEY in state:
        stored = state.pop(CHECKSUM_KEY)
        if stored != content_digest(state):
            raise UserError(f"checkpoint {path} is corrupt: its content does not match the checksum stored in it")
    return state


def load_latest(directory: Path, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint in `directory` (falling back over unreadable ones, with a warning each), or
    None where there is none; where there are checkpoints but none can be read, one UserError naming each."""
    paths = list_checkpoints(directory)
    failures: list[tuple[Path, UserError]] = []
    for path in reversed(paths):
        try:
            found = path, load_checkpoint(path)
        except UserError as err:
            failures.append((path, err))
            continue
        for _, err in failures:
            warn(f"{err}; falling back to the previous checkpoint")
        return found
    if failures:
        reasons = "; ".join(str(err).replace(f"checkpoint {path}", path.name).replace(str(path), path.name)
                            for path, err in reversed(failures))
        raise UserError(f"none of the {len(failures)} checkpoint(s) in {directory} can be read ({reasons}); restore "
                        f"them from a copy to resume, or pass --overwrite true to delete them and start over")
    return None


def content_digest(state: Any) -> str:
    """SHA-256 over a nest of dicts, lists, tensors and plain values: keys, order, dtypes, shapes and every byte."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            digest.update(f"dict {len(value)};".encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, list | tuple):
            digest.update(f"{type(value).__name__} {len(value)};".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed(state)
    return digest.hexdigest()


def first_shape_mismatch(saved: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> str | None:
    """The first tensor (in `expected`'s order) that is missing, extra or shaped differently in `saved`, described
    in words; None when every tensor fits."""
    for name, shape in expected.items():
        if name not in saved:
            return f"{name} is missing from the checkpoint"
        if tuple(saved[name].shape) != tuple(shape):
            return f"{name} has shape {tuple(saved[name].shape)} in the checkpoint but {tuple(shape)} in this model"
    extra = [name for name in saved if name not in expected]
    return f"{extra[0]} is in the checkpoint but not in this model" if extra else None


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: saved -> current' for every trajectory setting that differs between a checkpoint and this run."""
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)]


def checkpoint_state(round_index: int, identity: dict[str, Any], results: dict[str, Any], state: GlobalState,
                     base: dict[str, torch.Tensor] | None,
                     client_states: dict[int, OwnState] | None = None,
                     client_ranks: dict[int, int] | None = None) -> dict[str, Any]:
    """What a round's checkpoint holds (on the CPU); `base` only once merges changed the frozen weights,
    `client_states` only where clients keep tensors of their own between rounds (`ClientRule.keeps`, a local
    adapter, the local bound): each client's own, so that a resumed run starts each client from exactly what it
    kept; `client_ranks` (client id -> LoRA rank) only where clients may lower their own rank
    (`Aggregator.self_prunes`)."""
    return {"round": round_index, "identity": identity, "results": results,
            "lora": nest_pairs(state.lora),
            "lora_by_rank": {rank: nest_pairs(pairs) for rank, pairs in state.by_rank.items()},
            "extra": {name: t.cpu() for name, t in state.extra.items()},
            "base": {name: t.cpu() for name, t in base.items()} if base is not None else None,
            "client_states": {key: t.cpu() for key, t in pack_clients(client_states or {}).items()},
            "client_ranks": dict(client_ranks or {})}


def read_resume(out_dir: Path, cfg: FitConfig, identity: dict[str, Any], model: nn.Module,
                log: Callable[[str], None]) -> ResumeState | None:
    """Rank 0: None for a fresh start, else the state of the checkpoint to resume from (`find_checkpoint`), checked
    against this run's `identity` and settings and against its model."""
    found = find_checkpoint(out_dir, cfg.resume, cfg.overwrite, log)
    if found is None:
        return None
    resumed = resume_state(*found, identity, cfg.federation.rounds, cfg.resume_force, log)
    check_fits(resumed, state_shapes(model))
    return resumed


def find_checkpoint(out_dir: Path, resume: str | None, overwrite: bool,
                    log: Callable[[str], None]) -> tuple[Path, Any] | None:
    """The checkpoint to resume from: the newest readable one for resume="auto", the file `resume` names, or None
    for a fresh start once out_dir is clear for it (`clear_for_new_run`)."""
    directory = checkpoint_dir(out_dir)
    if resume is None or overwrite:
        clear_for_new_run(out_dir, overwrite, log)
        return None
    if resume == "auto":
        found = load_latest(directory, log)
        if found is None:
            log(f"no checkpoint in {directory}: starting from round 1")
            clear_for_new_run(out_dir, overwrite, log)
        return found
    return Path(resume), load_checkpoint(Path(resume))


def clear_for_new_run(out_dir: Path, overwrite: bool, log: Callable[[str], None]) -> None:
    """Before a run starts from round 1 in `out_dir`: refuse (UserError) where an earlier run's checkpoints or
    finished results.json are there, unless `overwrite`, which deletes them (said in the log). A stale, unfinished
    results.json is removed: its records would read as this run's."""
    checkpoints = list_checkpoints(checkpoint_dir(out_dir))
    results = results_path(out_dir)
    finished = results.is_file() and _holds_final(results)
    if (checkpoints or finished) and not overwrite:
        held = f"{len(checkpoints)} checkpoint(s)" if checkpoints else "the finished results.json"
        raise UserError(f"out_dir {out_dir} holds an earlier run ({held}); pass --resume auto to continue it, "
                        f"--overwrite true to delete it and start over, or another --out_dir")
    if checkpoints or finished:
        log(f"starting a new run in {out_dir}: deleting {len(checkpoints)} checkpoint(s) and the results.json of an "
            f"earlier run there (--overwrite true)")
    for path in checkpoints:
        path.unlink()
    results.unlink(missing_ok=True)


def _holds_final(results: Path) -> bool:
    try:
        return is_finished(read_results(results))
    except UserError:
        return False


def read_round(path: Path, state: Any) -> ResumeState:
    """The checkpoint `state` read from `path` as the global model after its round, in the tensor-key format of
    `lorafair.keys`; a file that is no lorafair checkpoint is one UserError."""
    missing = sorted(CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else sorted(CHECKPOINT_KEYS)
    if missing:
        raise UserError(f"{path} is not a lorafair checkpoint (it lacks {', '.join(missing)})")
    try:
        tensors = {**pack_pairs("lora", unnest_pairs(state["lora"])),
                   **pack_by_rank({rank: unnest_pairs(pairs) for rank, pairs in state.get("lora_by_rank", {}).items()}),
                   **pack("extra", state["extra"]), **pack("base", state["base"])}
        records = [current_round_record(record) for record in state["results"]["rounds"]]
        start = state["results"].get("start")
        own = dict(state.get("client_states", {}))
        client_states = unpack_clients(own)
        client_ranks = dict(state.get("client_ranks", {}))
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path} is not a lorafair checkpoint (its tensors are malformed: {err!r})") from err
    problem = _bad_round(state["round"]) or _bad_tensor({**tensors, **own}) or _bad_ranks(client_ranks)
    if problem:
        raise UserError(f"{path} cannot be used: {problem}; restore the file or resume from another checkpoint")
    return ResumeState(round=state["round"], path=path, records=records,
                       state=GlobalState.from_tensors(tensors),
                       base=unpack(tensors, "base"), start=start, client_states=client_states,
                       client_ranks=client_ranks)


def _bad_round(value: Any) -> str | None:
    """Why a checkpoint's `round` is not the number of a finished round (a positive int), or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"its round is {value!r} ({type(value).__name__}), not a whole number"
    return f"its round is {value}, not a round number (1 or more)" if value < 1 else None


def _bad_ranks(client_ranks: Mapping[Any, Any]) -> str | None:
    """Why a checkpoint's client ranks are not client id -> LoRA rank (whole numbers, ranks 1 or more), or None."""
    for client, rank in client_ranks.items():
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in (client, rank)) or rank < 1:
            return f"its client_ranks maps {client!r} to {rank!r}, not a client id to a LoRA rank of 1 or more"
    return None


def _bad_tensor(tensors: Mapping[str, Any]) -> str | None:
    """The first tensor of a checkpoint that cannot be the model's state, described, or None: the LoRA factors and
    the trained head are float32 (as lorafair trains them), the frozen weights floating point, and all finite."""
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            return f"{key} is a {type(tensor).__name__}, not a tensor"
        if key.startswith("base/") and not tensor.is_floating_point():
            return f"{key} is {tensor.dtype}, not a floating-point tensor"
        if not key.startswith("base/") and tensor.dtype != torch.float32:
            return f"{key} is {tensor.dtype}; lorafair keeps LoRA factors and trained tensors in torch.float32"
        if not bool(torch.isfinite(tensor).all()):
            return f"{key} holds NaN or Inf values"
    return None


def resume_state(path: Path, state: Any, identity: dict[str, Any], rounds: int, force: bool,
                 log: Callable[[str], None]) -> ResumeState:
    """The checkpoint `state` read from `path` as a ResumeState, after checking that it is a lorafair checkpoint
    of this run (same identity unless `force`) with no more than `rounds` rounds done."""
    try:
        resumed = read_round(path, state)
    except UserError as err:
        raise UserError(f"resume: {err}") from err
    differences = identity_differences(state["identity"], identity)
    if differences and not force:
        raise UserError(f"resume: {path} was written by a run with other settings ({'; '.join(differences)}); "
                        f"resume with the same settings, start a new run in another out_dir, or pass "
                        f"--resume_force true to continue anyway (the results then match no single run)")
    if differences:
        log(f"warning: resume_force: continuing from {path}, written with other settings ({'; '.join(differences)})")
    if resumed.round > rounds:
        raise UserError(f"federation.rounds: {rounds} is fewer than the {resumed.round} rounds already done in "
                        f"{path}; raise it")
    return resumed


def check_fits(resumed: ResumeState, expected: Mapping[str, torch.Size]) -> None:
    """Refuse a checkpoint's state whose tensors do not fit the model (`expected`: shapes in the packed key format)."""
    # the lower ranks' starting pairs depend on lora.client_ranks, which the identity checks
    tensors = {key: tensor for key, tensor in {**resumed.state.tensors(), **pack("base", resumed.base)}.items()
               if not is_by_rank(key)}
    # the frozen weights are checked only where the checkpoint holds them (after merges)
    expected = {key: shape for key, shape in expected.items() if resumed.base or not key.startswith("base/")}
    mismatch = first_shape_mismatch(tensors, expected)
    if mismatch:
        raise UserError(f"{resumed.path} does not fit this model: {mismatch}; use it with the model and LoRA "
                        f"settings it was written with")
