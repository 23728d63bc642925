"""What passes between the roles of a round, and the one format of named tensors on the wire and on disk.

Named tensors are keyed "<kind>/<layer>/<factor>" for LoRA pairs ("lora/blocks.0.attn.proj/A") and "<kind>/<name>"
for single tensors ("extra/head.weight", "base/blocks.0.attn.proj"): client updates, the server's answer, the resume
state and the checkpoints all use it, so any transport moves a flat {key: tensor} mapping and small plain values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from lorafair.aggregation import ClientUpdate

Pairs = dict[str, tuple[Tensor, Tensor]]
"""Layer name -> (A: r x in, B: out x r)."""


def pack_pairs(kind: str, pairs: Pairs | None) -> dict[str, Tensor]:
    """{"blocks.0.attn.proj": (A, B)} -> {"lora/blocks.0.attn.proj/A": A, "lora/blocks.0.attn.proj/B": B}."""
    return {f"{kind}/{name}/{factor}": tensor for name, pair in (pairs or {}).items()
            for factor, tensor in zip("AB", pair, strict=True)}


def pack(kind: str, tensors: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """{"head.weight": t} -> {"extra/head.weight": t}."""
    return {f"{kind}/{name}": tensor for name, tensor in (tensors or {}).items()}


def unpack_pairs(tensors: dict[str, Tensor], kind: str) -> Pairs:
    """Inverse of `pack_pairs` for one kind of a mixed mapping."""
    names = [key[len(kind) + 1:-2] for key in tensors if key.startswith(f"{kind}/") and key.endswith("/A")]
    return {name: (tensors[f"{kind}/{name}/A"], tensors[f"{kind}/{name}/B"]) for name in names}


def unpack(tensors: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """Inverse of `pack` for one kind of a mixed mapping."""
    return {key[len(kind) + 1:]: tensor for key, tensor in tensors.items() if key.startswith(f"{kind}/")}


def pack_by_rank(by_rank: dict[int, Pairs] | None) -> dict[str, Tensor]:
    """Starting pairs of lower ranks under the kinds "lora_r<rank>" ("lora_r4/blocks.0.attn.proj/A")."""
    return {key: tensor for rank, pairs in (by_rank or {}).items()
            for key, tensor in pack_pairs(f"lora_r{rank}", pairs).items()}


def unpack_by_rank(tensors: dict[str, Tensor]) -> dict[int, Pairs]:
    """Inverse of `pack_by_rank` for a mixed mapping."""
    kinds = sorted({key.split("/")[0] for key in tensors if key.startswith("lora_r")}, key=lambda k: int(k[6:]))
    return {int(kind[6:]): unpack_pairs(tensors, kind) for kind in kinds}


@dataclass
class GlobalState:
    """What every client starts a round from: the global LoRA pairs, the extra tensors (classifier head) and, for
    each client rank below the global one, the pairs a client of that rank starts from (in its own scaling)."""

    lora: Pairs
    extra: dict[str, Tensor]
    by_rank: dict[int, Pairs] = field(default_factory=dict)

    def lora_for(self, rank: int) -> Pairs:
        return self.by_rank.get(rank, self.lora)

    def tensors(self) -> dict[str, Tensor]:
        return {**pack_pairs("lora", self.lora), **pack_by_rank(self.by_rank), **pack("extra", self.extra)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> GlobalState:
        return cls(unpack_pairs(tensors, "lora"), unpack(tensors, "extra"), unpack_by_rank(tensors))


@dataclass
class ClientResult:
    """One client's answer to a round: its update for the server and the statistics for the round record."""

    client: int
    update: ClientUpdate
    """weight = the client's number of training samples."""
    train_loss: float
    steps: int
    skipped_images: int


@dataclass
class ServerRecord:
    """The server's part of a round's record: what it received, what it dropped and what it sent."""

    train_loss: dict[str, float]
    train_steps: dict[str, int]
    skipped_images: int
    bad_updates: dict[str, str]
    """Client id -> why its update was left out of the round."""
    skipped: bool = False
    """No usable update: the global state stays as it was."""
    bytes_up: int = 0
    bytes_down: int = 0
    """Bytes per client this round: the mean over the round's clients (of different ranks, they differ)."""
    bytes_by_client: dict[str, list[int]] = field(default_factory=dict)
    """Client id -> [bytes up, bytes down], which follow its rank."""
    aggregation: dict[str, float] = field(default_factory=dict)
    failed_clients: dict[str, str] = field(default_factory=dict)
    """Client id -> why it sent no result (its node failed mid-round under Flower; the round went on without it)."""


@dataclass
class RoundRecord:
    """One round's entry of results.json, written by rank 0."""

    round: int
    clients: list[int]
    ranks: dict[str, int]
    """Client id -> the rank that trained it."""
    server: ServerRecord
    seconds: dict[str, float]
    accuracy: dict[str, float] | None = None
    eval_loss: dict[str, float] | None = None
    """Mean cross-entropy per domain, for models that report one (instruction data: over the response tokens)."""

    def to_dict(self) -> dict[str, Any]:
        seconds = self.seconds
        record = {"round": self.round, "clients": self.clients, "ranks": self.ranks, **asdict(self.server),
                  "seconds": seconds, "overhead": (seconds["comm"] + seconds["aggregate"]) / seconds["round"]}
        if self.accuracy is not None:
            record["accuracy"] = self.accuracy
            record["mean_accuracy"] = sum(self.accuracy.values()) / len(self.accuracy)
        if self.eval_loss is not None:
            record["eval_loss"] = self.eval_loss
            record["mean_eval_loss"] = sum(self.eval_loss.values()) / len(self.eval_loss)
        return record


@dataclass
class ServerAnswer:
    """The server's answer to a round, the same on every rank once the transport delivered it."""

    lora: Pairs | None
    """The next round's starting pairs; None: every client restarts from a fresh LoRA (FLoRA)."""
    merge: Pairs | None
    """Pairs whose product (times the global LoRA scaling) every client adds to its frozen weights."""
    extra: dict[str, Tensor]
    record: ServerRecord
    by_rank: dict[int, Pairs] = field(default_factory=dict)
    """Lower rank -> the starting pairs of its clients (their own scaling)."""

    def to_wire(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {**pack_pairs("lora", self.lora), **pack_by_rank(self.by_rank), **pack_pairs("merge", self.merge),
                   **pack("extra", self.extra)}
        return tensors, {"record": self.record, "fresh_lora": self.lora is None}

    @classmethod
    def from_wire(cls, tensors: dict[str, Tensor], info: dict[str, Any]) -> ServerAnswer:
        return cls(lora=None if info["fresh_lora"] else unpack_pairs(tensors, "lora"),
                   merge=unpack_pairs(tensors, "merge") or None, extra=unpack(tensors, "extra"), record=info["record"],
                   by_rank=unpack_by_rank(tensors))


@dataclass
class ResumeState:
    """Where a resumed run continues from: the last finished round, its records and the global model then."""

    round: int
    path: Path
    records: list[dict[str, Any]]
    state: GlobalState
    base: dict[str, Tensor] = field(default_factory=dict)
    """The frozen weights of the adapted layers after the merges so far; empty when nothing was merged."""

    def to_wire(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return ({**self.state.tensors(), **pack("base", self.base)},
                {"round": self.round, "path": str(self.path), "records": self.records})

    @classmethod
    def from_wire(cls, tensors: dict[str, Tensor], info: dict[str, Any]) -> ResumeState:
        return cls(round=info["round"], path=Path(info["path"]), records=info["records"],
                   state=GlobalState.from_tensors(tensors), base=unpack(tensors, "base"))
