"""The server role: the round's client results in, the answer every client applies and the server's record out.

A round is pre-reduced on the ranks: every rank folds its own clients into a `RoundState` (`fold`), the transport
sums the folds' accumulators over the ranks and shares the clients' reports, every rank applies the bad-update
policy to the same reports (`decide`), and rank 0 turns the summed fold into the answer (`finish`). It knows
nothing of torch.distributed: a UserError it raises is raised on every rank, with the same message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorafair.aggregation import (
    Aggregator,
    ClientRule,
    ClientUpdate,
    RoundState,
    build_aggregator,
    find_bad_updates,
    method_options,
)
from lorafair.config import ServerConfig
from lorafair.errors import UserError
from lorafair.federated.state import ClientResult, ServerAnswer, ServerRecord
from lorafair.seeds import derive_seed


def aggregator_options(server_cfg: ServerConfig, seed: int, round_index: int = 0) -> dict[str, Any]:
    """The method's options taken from the server section, and a seed of (run seed, round) where the method draws
    randoms: a round's draws then do not depend on the rounds before it, so a resumed run repeats them."""
    settings = {**vars(server_cfg), "seed": derive_seed("server", seed, round_index)}
    return {name: settings[name] for name in method_options(server_cfg.method) if name in settings}


@dataclass
class ClientReport:
    """What the round record and the bad-update policy need of one client, sent by the rank that trained it."""

    client: int
    train_loss: float
    steps: int
    skipped_images: int
    rank: int
    """The LoRA rank of its update (its bytes follow it)."""
    bad: str | None = None
    """Why its update was left out of the round; None: it was folded in."""


@dataclass
class RankFold:
    """One rank's part of a round: its good clients folded into `state`, the reports of all its clients, and why
    the method refuses the round (a factor its client rule freezes differs from the shared one), if it does."""

    state: RoundState
    reports: list[ClientReport]
    refusal: str | None = None


class Server:
    """Aggregates each round with the configured method; `log` prints the warnings (rank 0's console)."""

    def __init__(self, server_cfg: ServerConfig, on_bad_update: str, seed: int,
                 log: Callable[[str], None] = print) -> None:
        self.server_cfg, self.on_bad_update, self.seed, self.log = server_cfg, on_bad_update, seed, log
        self.aggregator: Aggregator = build_aggregator(server_cfg.method, **aggregator_options(server_cfg, seed))

    def client_rule(self, round_index: int) -> ClientRule:
        """What the method's clients train, upload and keep in round `round_index`."""
        return self.aggregator.client_rule(round_index)

    def fold(self, round_index: int, results: Sequence[ClientResult], slots: Sequence[int], like: ClientUpdate,
             clients: int, lower_ranks: Sequence[int] = ()) -> RankFold:
        """Every rank: fold this rank's good results into a round of `clients` slots (result i into slots[i], its
        index among the round's sampled clients). `like`, `clients` and `lower_ranks` (the client ranks below the
        global one, each of which gets its starting pairs) must be the same on every rank, so the folds'
        accumulators line up; the round's client rule says which factors are folded (the uploaded ones)."""
        if "seed" in method_options(self.server_cfg.method):
            self.aggregator = build_aggregator(self.server_cfg.method,
                                               **aggregator_options(self.server_cfg, self.seed, round_index))
        state = self.aggregator.start(like, clients=clients, lower_ranks=lower_ranks, round_index=round_index)
        bad = unusable_updates([result.train_loss for result in results], [result.update for result in results])
        refusal = None
        for position, (result, slot) in enumerate(zip(results, slots, strict=True)):
            if position in bad:
                continue
            try:
                state.add(result.update, slot=slot)
            except ValueError as err:  # a mis-shaped update: the round cannot go on
                refusal = refusal or f"client {result.client}: {err}"
            else:
                refusal = refusal or self.aggregator.refusal(result.client, result.update, like, state.rule)
        reports = [ClientReport(r.client, r.train_loss, r.steps, r.skipped_images, update_rank(r.update),
                                bad.get(position))
                   for position, r in enumerate(results)]
        return RankFold(state, reports, refusal)

    def decide(self, round_index: int, reports: Sequence[ClientReport], refusals: Sequence[str | None],
               unreadable: Mapping[str, str] | None = None) -> ServerRecord:
        """Every rank, on every rank's reports and refusals: the round's record (skipped when no update is usable),
        or a UserError that stops the run (on_bad_update=error, or a round the method refuses). unreadable: client
        id -> why, for clients whose reply never became a result (a Flower node's malformed reply); bad updates too."""
        reports = sorted(reports, key=lambda report: report.client)
        bad = {**{str(r.client): r.bad for r in reports if r.bad is not None}, **(unreadable or {})}
        record = ServerRecord(train_loss={str(r.client): r.train_loss for r in reports},
                              train_steps={str(r.client): r.steps for r in reports},
                              skipped_images=sum(r.skipped_images for r in reports),
                              bad_updates=dict(sorted(bad.items(), key=lambda item: int(item[0]))))
        total = len(reports) + len(unreadable or {})
        if not BadUpdatePolicy(self.on_bad_update, log=self.log).keeps_any(round_index, record.bad_updates, total):
            record.skipped = True
            return record
        refusal = next((refusal for refusal in refusals if refusal is not None), None)
        if refusal is not None:
            raise UserError(f"round {round_index}: aggregation failed: {refusal}")
        return record

    def finish(self, round_index: int, state: RoundState, record: ServerRecord,
               reports: Sequence[ClientReport]) -> ServerAnswer:
        """Rank 0: the answer to the round from its fold summed over the ranks (`record` from `decide`, on every
        rank's `reports`); each good client's bytes follow its rank, the record's bytes are their mean."""
        if record.skipped:
            return ServerAnswer(lora=None, merge=None, extra={}, record=record)
        try:
            update = state.finish()
        except ValueError as err:  # e.g. factors that overflow float32
            raise UserError(f"round {round_index}: aggregation failed: {err}") from err
        record.bytes_by_client = {str(report.client): list(update.bytes_for(report.rank))
                                  for report in sorted(reports, key=lambda report: report.client) if report.bad is None}
        per_client = list(record.bytes_by_client.values())
        record.bytes_up, record.bytes_down = (round(sum(values) / len(values))
                                              for values in zip(*per_client, strict=True))
        record.aggregation = {name: float(value) for name, value in update.metrics.items()}
        return ServerAnswer(lora=update.lora, merge=update.merge, extra=update.extra, record=record,
                            by_rank=update.by_rank)


def unusable_updates(losses: Sequence[float], updates: Sequence[ClientUpdate]) -> dict[int, str]:
    """Position -> why that client's update is unusable: a non-finite local loss, or NaN/Inf in the update."""
    bad = {position: f"local train loss is {loss}" for position, loss in enumerate(losses) if not math.isfinite(loss)}
    bad.update(find_bad_updates(updates))
    return bad


@dataclass
class BadUpdatePolicy:
    """What a round does with unusable updates (`unusable_updates`, or replies that cannot be read): drop them, the
    others re-weighted, or stop the run. The one policy of `fit`'s server and of the Flower strategy."""

    on_bad_update: str
    """drop or error."""
    log: Callable[[str], None] | None = print
    """Where the warnings of dropped updates go; None: nowhere."""
    setting: str = "federation.on_bad_update"
    """How the message of a stopped run names the setting."""

    def keeps_any(self, round_index: int, bad: Mapping[str, str], total: int) -> bool:
        """Whether any of the round's `total` updates is left once the bad ones (client id -> why) are dropped; a
        UserError that stops the run where the policy is error and some update is bad."""
        if bad:
            described = "; ".join(f"client {client}: {reason}" for client, reason in bad.items())
            if self.on_bad_update == "error":
                raise UserError(f"round {round_index}: bad client update ({described}); {self.setting}=error stops "
                                f"the run, 'drop' leaves such clients out of the round")
            self._warn(f"warning: round {round_index}: dropping {len(bad)} bad update(s), the others are "
                       f"re-weighted: {described}")
        if len(bad) == total:
            self._warn(f"warning: round {round_index}: no usable update, the global model stays as it was")
            return False
        return True

    def _warn(self, message: str) -> None:
        if self.log is not None:
            self.log(message)


def update_rank(update: ClientUpdate) -> int:
    """The LoRA rank of a client's update (that of its first layer; a mis-shaped update is refused by the fold)."""
    return next(iter(update.lora.values()))[0].shape[0]
