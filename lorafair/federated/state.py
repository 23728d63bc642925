"""What passes between the roles of a round, as dataclasses that travel as named tensors (`lorafair.keys`) and
small plain values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorafair.aggregation import ClientRule, ClientUpdate
from lorafair.keys import (
    LOCAL,
    LOCAL_FEATURES,
    Pairs,
    pack,
    pack_by_rank,
    pack_clients,
    pack_pairs,
    pair_key,
    unpack,
    unpack_by_rank,
    unpack_clients,
    unpack_pairs,
)

OwnState = dict[str, Tensor]
"""What a client keeps of its own between rounds, keyed as `GlobalState.tensors` keys its tensors
("lora/blocks.0.attn.proj/B"), at the client's LoRA rank."""


@dataclass
class GlobalState:
    """What every client starts a round from: the global LoRA pairs, the extra tensors (classifier head) and, for
    each client rank below the global one, the pairs a client of that rank starts from (in its own scaling)."""

    lora: Pairs
    extra: dict[str, Tensor]
    by_rank: dict[int, Pairs] = field(default_factory=dict)
    local: OwnState = field(default_factory=dict)
    """One client's local adapter ("local/<layer>/A", ...) and the summary of its training inputs
    ("local_features"), where its method gives it one (`ClientRule.local`); empty for the global model."""

    def lora_for(self, rank: int) -> Pairs:
        return self.by_rank.get(rank, self.lora)

    def tensors(self) -> dict[str, Tensor]:
        return {**pack_pairs("lora", self.lora), **pack_by_rank(self.by_rank), **pack("extra", self.extra)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> GlobalState:
        return cls(unpack_pairs(tensors, "lora"), unpack(tensors, "extra"), unpack_by_rank(tensors))

    def overlaid(self, own: OwnState, rank: int) -> GlobalState:
        """The state a client of LoRA `rank` starts from when it keeps `own`: this state's pairs for its rank and
        extra tensors, with its own tensors in their place."""
        tensors = {**pack_pairs("lora", self.lora_for(rank)), **pack("extra", self.extra), **own}
        local = {key: tensor for key, tensor in own.items() if is_local(key)}
        return GlobalState(unpack_pairs(tensors, "lora"), unpack(tensors, "extra"), local=local)

    def kept(self, rule: ClientRule, rank: int) -> OwnState:
        """What a client of LoRA `rank` whose `rule` keeps tensors holds of this state (`kept_tensors`), and a
        local adapter's start where the rule gives one: this state's A with B = 0, no contribution yet."""
        lora = self.lora_for(rank)
        local = {} if rule.local is None else {name: (A, torch.zeros_like(B)) for name, (A, B) in lora.items()}
        return {**kept_tensors(lora, self.extra, rule),
                **{key: tensor.detach().to("cpu", copy=True) for key, tensor in pack_pairs(LOCAL, local).items()}}


def is_local(key: str) -> bool:
    """Whether a client's tensor under `key` belongs to its local adapter (`GlobalState.local`), never to the
    shared model."""
    return key.startswith(f"{LOCAL}/") or key == LOCAL_FEATURES


def kept_tensors(lora: Pairs, extra: dict[str, Tensor], rule: ClientRule) -> OwnState:
    """The tensors of a client's state that `rule` keeps on the client between rounds, copied to the CPU (a copy of
    its own, which no other client's state can share)."""
    tensors = {pair_key("lora", name, factor): pair["AB".index(factor)] for name, pair in lora.items()
               for factor in rule.keeps}
    if rule.keeps_extra:
        tensors.update(pack("extra", extra))
    return {key: tensor.detach().to("cpu", copy=True) for key, tensor in tensors.items()}


@dataclass
class ClientResult:
    """One client's answer to a round: its update for the server and the statistics for the round record."""

    client: int
    update: ClientUpdate
    """weight = the client's number of training samples."""
    train_loss: float
    steps: int
    skipped_images: int
    local: OwnState = field(default_factory=dict)
    """Its local adapter and the summary of its training inputs, on the CPU (`GlobalState.local`): kept on the
    client, never uploaded; empty where its method gives it none."""


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


def encode_items(right: Tensor) -> str | None:
    """A test set's per-item scores (1 right, 0 wrong) as "<count>:<hex of the packed bits>", the compact form
    results.json keeps them in for paired comparisons; None where they are not all 0 or 1 (an item was skipped)."""
    bits = right.to(torch.float64)
    if not bool(((bits == 0) | (bits == 1)).all()):
        return None
    padded = torch.zeros(-(-len(bits) // 8) * 8, dtype=torch.uint8)
    padded[:len(bits)] = bits.to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    packed = (padded.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)
    return f"{len(bits)}:{bytes(packed.tolist()).hex()}"


def decode_items(text: str) -> Tensor:
    """Inverse of `encode_items`: a float64 vector of 0 and 1."""
    count, _, hexdigits = text.partition(":")
    packed = torch.tensor(list(bytes.fromhex(hexdigits)), dtype=torch.uint8)
    bits = ((packed[:, None] >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1).flatten()
    return bits[:int(count)].to(torch.float64)


@dataclass
class Scores:
    """A model's (or, under the local bound, the clients' own models') scores per domain."""

    accuracy: dict[str, float]
    eval_loss: dict[str, float] | None
    """Mean cross-entropy per domain, for models that report one (instruction data: over the response tokens)."""
    items: dict[str, list[Tensor]]
    """Per domain, per model scored on it: 1 where a test item is right, 0 where wrong."""

    @classmethod
    def of(cls, domains: list[str], rows: list[str], sums: Tensor, items: list[Tensor]) -> Scores:
        """From `LocalTrainer.evaluation_sums` summed over the shards, with one row (and item vector) per model
        and test set, `rows` naming each row's domain: a domain's score is the mean over its rows (NaN where it has
        none: under Flower, every node of its clients failed to score)."""
        def mean_of(ratios: Tensor, domain: str) -> float:
            scored = [ratios[i] for i, name in enumerate(rows) if name == domain]
            return torch.stack(scored).mean().item() if scored else float("nan")  # no model of it was scored

        accuracy = {domain: mean_of(sums[:, 0] / sums[:, 1], domain) for domain in domains}
        eval_loss = (None if not sums[:, 3].any() else
                     {domain: mean_of(sums[:, 2] / sums[:, 3], domain) for domain in domains})
        return cls(accuracy, eval_loss, {domain: [items[i] for i, name in enumerate(rows) if name == domain]
                                         for domain in domains})

    def to_dict(self, items: bool) -> dict[str, Any]:
        """The entry of results.json (in a round record, or as the starting model's); `items`: with the per-item
        scores (kept for the starting model and the last round only)."""
        entry: dict[str, Any] = {"accuracy": self.accuracy,
                                 "mean_accuracy": sum(self.accuracy.values()) / len(self.accuracy)}
        if self.eval_loss is not None:
            entry["eval_loss"] = self.eval_loss
            entry["mean_eval_loss"] = sum(self.eval_loss.values()) / len(self.eval_loss)
        encoded = {domain: [encode_items(vector) for vector in vectors] for domain, vectors in self.items.items()}
        if items and all(text is not None for texts in encoded.values() for text in texts):
            entry["correct_items"] = encoded
        return entry


@dataclass
class RoundRecord:
    """One round's entry of results.json, written by rank 0."""

    round: int
    clients: list[int]
    processes: dict[str, int]
    """Client id -> the process that trained it: its rank in a torchrun job (0 in a single process), its node id
    under Flower. Written as `processes` (`ranks` in results.json files of earlier versions)."""
    server: ServerRecord
    seconds: dict[str, float]
    scores: Scores | None = None
    """None in a round that was not evaluated."""
    personalised: Scores | None = None
    """Each client's own model on its own domain's test set, where clients keep factors of their own (None
    elsewhere, and in a round that was not evaluated)."""
    items: bool = False
    """Keep the per-item scores (the last round)."""
    global_model: str | None = None
    """Why the round has no global scores though it was evaluated (a method whose clients keep factors, under
    Flower: the server never sees them); None where it has them or was not evaluated."""

    def to_dict(self) -> dict[str, Any]:
        seconds = self.seconds
        record = {"round": self.round, "clients": self.clients, "processes": self.processes, **asdict(self.server),
                  "seconds": seconds, "overhead": (seconds["comm"] + seconds["aggregate"]) / seconds["round"]}
        if self.scores is not None:
            record.update(self.scores.to_dict(self.items))
        if self.personalised is not None:
            record["personalised"] = self.personalised.to_dict(self.items)
        if self.global_model is not None:
            record["global_model"] = self.global_model
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
    start: dict[str, Any] | None = None
    """The starting model's scores (round 0); None in a checkpoint of a run that did not score it."""
    client_states: dict[int, OwnState] = field(default_factory=dict)
    """What each client keeps of its own between rounds (its whole state under the local bound)."""
    client_ranks: dict[int, int] = field(default_factory=dict)
    """Each client's LoRA rank, where clients may lower their own (`Aggregator.self_prunes`); empty elsewhere."""

    def to_wire(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return ({**self.state.tensors(), **pack("base", self.base), **pack_clients(self.client_states)},
                {"round": self.round, "path": str(self.path), "records": self.records, "start": self.start,
                 "client_ranks": self.client_ranks})

    @classmethod
    def from_wire(cls, tensors: dict[str, Tensor], info: dict[str, Any]) -> ResumeState:
        return cls(round=info["round"], path=Path(info["path"]), records=info["records"],
                   state=GlobalState.from_tensors(tensors), base=unpack(tensors, "base"), start=info["start"],
                   client_states=unpack_clients(tensors), client_ranks=info["client_ranks"])
