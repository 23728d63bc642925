"""The server role: the round's client results in, the answer every client applies and the server's record out.

It applies the bad-update policy (drop and re-weight, or stop), calls the aggregation method and reports what it
did. It knows nothing of torch.distributed: the transport hands it the results and delivers its answer, and a
UserError it raises reaches every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lorafair.aggregation import Aggregator, ClientUpdate, build_aggregator, find_bad_updates, method_options
from lorafair.config import ServerConfig
from lorafair.errors import UserError
from lorafair.federated.sampling import derive_seed
from lorafair.federated.state import ClientResult, ServerAnswer, ServerRecord


def aggregator_options(server_cfg: ServerConfig, seed: int, round_index: int = 0) -> dict[str, Any]:
    """The method's options taken from the server section, and a seed of (run seed, round) where the method draws
    randoms: a round's draws then do not depend on the rounds before it, so a resumed run repeats them."""
    settings = {**vars(server_cfg), "seed": derive_seed("server", seed, round_index)}
    return {name: settings[name] for name in method_options(server_cfg.method) if name in settings}


class Server:
    """Aggregates each round with the configured method; `log` prints the warnings (rank 0's console)."""

    def __init__(self, server_cfg: ServerConfig, on_bad_update: str, seed: int,
                 log: Callable[[str], None] = print) -> None:
        self.server_cfg, self.on_bad_update, self.seed, self.log = server_cfg, on_bad_update, seed, log
        self.aggregator: Aggregator = build_aggregator(server_cfg.method, **aggregator_options(server_cfg, seed))

    def aggregate(self, round_index: int, results: list[ClientResult], like: ClientUpdate | None = None,
                  lower_ranks: tuple[int, ...] = ()) -> ServerAnswer:
        """The answer to a round whose results are ordered by client id; raises UserError to stop the run.
        like: the global state as an update (the global ranks, FFA-LoRA's frozen A; None: the update of the
        largest rank); lower_ranks: the clients' ranks below the global one, each of which gets its starting pairs."""
        if "seed" in method_options(self.server_cfg.method):
            self.aggregator = build_aggregator(self.server_cfg.method,
                                               **aggregator_options(self.server_cfg, self.seed, round_index))
        bad = self._bad_clients(round_index, results)
        record = ServerRecord(train_loss={str(r.client): r.train_loss for r in results},
                              train_steps={str(r.client): r.steps for r in results},
                              skipped_images=sum(r.skipped_images for r in results),
                              bad_updates={str(results[i].client): reason for i, reason in sorted(bad.items())})
        good = [result.update for position, result in enumerate(results) if position not in bad]
        if not good:
            self.log(f"warning: round {round_index}: no usable update, the global model stays as it was")
            record.skipped = True
            return ServerAnswer(lora=None, merge=None, extra={}, record=record)
        try:
            update = self.aggregator.aggregate(good, like=like, lower_ranks=lower_ranks)
        except ValueError as err:  # e.g. FFA-LoRA clients whose A differ
            raise UserError(f"round {round_index}: aggregation failed: {err}") from err
        record.bytes_by_client = {str(result.client): list(update.bytes_for(_rank(result.update)))
                                  for position, result in enumerate(results) if position not in bad}
        per_client = list(record.bytes_by_client.values())
        record.bytes_up, record.bytes_down = (round(sum(values) / len(values))
                                              for values in zip(*per_client, strict=True))
        record.aggregation = {name: float(value) for name, value in update.metrics.items()}
        return ServerAnswer(lora=update.lora, merge=update.merge, extra=update.extra, record=record,
                            by_rank=update.by_rank)

    def _bad_clients(self, round_index: int, results: list[ClientResult]) -> dict[int, str]:
        """Position -> why that result is unusable; warns about them, or stops the run under on_bad_update=error."""
        bad = {position: f"local train loss is {result.train_loss}" for position, result in enumerate(results)
               if not math.isfinite(result.train_loss)}
        bad.update(find_bad_updates([result.update for result in results]))
        if not bad:
            return bad
        described = "; ".join(f"client {results[i].client}: {reason}" for i, reason in sorted(bad.items()))
        if self.on_bad_update == "error":
            raise UserError(f"round {round_index}: bad client update ({described}); federation.on_bad_update=error "
                            f"stops the run, 'drop' leaves such clients out of the round")
        self.log(f"warning: round {round_index}: dropping {len(bad)} bad update(s), the others are re-weighted: "
                 f"{described}")
        return bad


def _rank(update: ClientUpdate) -> int:
    return next(iter(update.lora.values()))[0].shape[0]
