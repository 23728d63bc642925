"""`LoraStrategy`: a Flower strategy (Message API) for lorafair's aggregation methods.

It is FedAvg with the averaging swapped for `lorafair.aggregation`: the same sampling, constructor arguments,
records and error handling (a node whose reply carries an error is left out of the round and logged), plus
lorafair's bad-update policy (`lorafair.federated.server.BadUpdatePolicy`: NaN/Inf updates and malformed replies
dropped and the others re-weighted, or the run stopped) and, for the methods that merge into the frozen weights
(FLoRA, FedEx-LoRA), a log of merges from which every node receives the ones it has not confirmed yet, so a node
that sat out rounds catches up exactly before it trains. Methods whose clients keep factors of their own between
rounds, or train other factors from round to round, are refused (`flower_refusal`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from lorafair.aggregation import (
    ClientUpdate,
    build_aggregator,
    method_class,
    method_options,
    registered_methods,
)
from lorafair.federated.server import BadUpdatePolicy, unusable_updates
from lorafair.flower.records import arrays_to_state, merges_to_arrays, state_to_arrays
from lorafair.keys import PEFT_A, PEFT_B, Pairs, peft_partner
from lorafair.seeds import derive_seed, fresh_lora, seeded_generator


def flower_refusal(method: str, options: dict[str, Any] | None = None) -> str | None:
    """Why `method` cannot run under Flower yet, from its traits and client rule, or None: lorafair's Flower nodes
    do not start LoRA from the SVD of their frozen weights or of a gradient nor prune their own rank, its Flower
    integration holds nothing a client keeps of its own between rounds (nor scores such a client's own model), and
    `LoraStrategy`'s messages do not tell a client which factors to train this round."""
    aggregator = build_aggregator(method, **(options or {}))
    if aggregator.starts_from_weights:
        return (f"{method} cannot run under Flower yet: its LoRA starts from the SVD of the frozen weights, taken out "
                "of them, which lorafair's Flower nodes do not do; run it with lorafair fit")
    if aggregator.starts_from_gradient:
        return (f"{method} cannot run under Flower yet: its LoRA starts from the SVD of a gradient every client "
                "takes before round 1, an exchange lorafair's Flower nodes do not make; run it with lorafair fit")
    if aggregator.self_prunes:
        return (f"{method} cannot run under Flower yet with rank self-pruning (server.prune_gamma below 1): its "
                "clients add a penalty to their loss and lower their own rank, which lorafair's Flower nodes do not "
                "do; run it with lorafair fit, or leave prune_gamma at 1")
    odd, even = aggregator.client_rule(1), aggregator.client_rule(2)
    if odd.personal or even.personal:
        kept = " and ".join(filter(None, (odd.keeps or even.keeps, "head" if odd.keeps_extra else "",
                                          "local adapter" if odd.local or even.local else "")))
        return (f"{method} cannot run under Flower yet: its clients keep their own {kept} between rounds, which "
                "lorafair's Flower integration does not hold; run it with lorafair fit")
    if odd != even:
        return (f"{method} cannot run under Flower yet: its clients train {odd.trains} in odd rounds and "
                f"{even.trains} in even ones, which lorafair's Flower messages do not tell them; run it with "
                "lorafair fit")
    return None


def check_secure_aggregation(method: str) -> None:
    """Refuse a method that needs each client's factors where the server may only see their sum."""
    if not method_class(method).sums_only:
        sums_only = sorted(name for name in registered_methods() if method_class(name).sums_only)
        raise ValueError(f"{method} needs each client's LoRA factors, which secure aggregation hides (it reveals "
                         f"only their sum); use {' or '.join(sums_only)} under secure aggregation")


class LoraStrategy(FedAvg):
    """Federated LoRA with any lorafair method.

    Parameters beyond FedAvg's (which keep their meaning and defaults)
    ----------
    method : str (default: "lorafair")
        One of `lorafair.aggregation.registered_methods()`.
    options : dict, optional
        The method's options (see `lorafair.aggregation.method_options(method)`), e.g. {"lam": 0.01}.
    seed : int (default: 0)
        Seeds the method's own draws (round by round) and the fresh LoRA start after a FLoRA merge.
    on_bad_update : "drop" | "error" (default: "drop")
        What to do with an update holding NaN/Inf (or a non-finite `train-loss` metric).
    secure_aggregation : bool (default: False)
        Declare that replies are only revealed as a sum; refused for methods that need each client's factors.
    mergerecord_key : str (default: "lorafair.merges")
        Key of the ArrayRecord carrying the merges a node has not applied yet (merging methods only).
    max_examples : int (default: 10**9)
        The largest example count (`weighted_by_key`) a reply may claim; a reply claiming more is dropped.
    max_weight_ratio : float or None (default: 10.0)
        A reply's weight in the aggregate is clipped to this many times the median count of the round's good
        replies (named in the round record's `clipped_weights`), so that no reply can dictate the aggregate by
        claiming many examples; None weighs every reply by its count as FedAvg does.

    Replies carry one ArrayRecord with the model's LoRA factors keyed as peft's state dict does
    (`L.lora_A.weight`, `L.lora_B.weight`) plus any other tensors (averaged), and one MetricRecord with
    `weighted_by_key`. An optional `partition-id` metric orders the clients in the aggregation (else node id), so
    results do not depend on the order replies arrive in.

    The arrays of the first `configure_train` fix the template: every reply must hold exactly these keys, in their
    dtype and shape (a LoRA pair may have a lower rank than the global one, never a higher one), and a positive
    example count up to `max_examples`. Any other reply (wrong shape or dtype, missing or extra keys, an empty or
    second ArrayRecord, a bad count) is dropped and named in the round record with its node, as a NaN update is;
    its sizes are checked on the record's metadata before any tensor is built from it.
    """

    def __init__(self, method: str = "lorafair", options: dict[str, Any] | None = None, *, seed: int = 0,
                 on_bad_update: str = "drop", secure_aggregation: bool = False,
                 mergerecord_key: str = "lorafair.merges", max_examples: int = 10**9,
                 max_weight_ratio: float | None = 10.0, **fedavg_kwargs: Any) -> None:
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", train_metrics_without_ids)
        super().__init__(**fedavg_kwargs)
        self.method, self.options, self.seed = method, dict(options or {}), seed
        build_aggregator(method, **self.options)  # unknown methods and options fail here, not in round 1
        refusal = flower_refusal(method, self.options)
        if refusal is not None:
            raise ValueError(refusal)
        if on_bad_update not in ("drop", "error"):
            raise ValueError(f"on_bad_update must be 'drop' or 'error', got {on_bad_update!r}")
        if secure_aggregation:
            check_secure_aggregation(method)
        self.on_bad_update, self.mergerecord_key = on_bad_update, mergerecord_key
        if not (isinstance(max_examples, int) and max_examples > 0):
            raise ValueError(f"max_examples must be a positive int, got {max_examples!r}")
        self.max_examples = max_examples
        if max_weight_ratio is not None and not (isinstance(max_weight_ratio, int | float) and max_weight_ratio >= 1):
            raise ValueError(f"max_weight_ratio must be a number >= 1 or None, got {max_weight_ratio!r}")
        self.max_weight_ratio = max_weight_ratio
        self.template: dict[str, tuple[tuple[int, ...], str]] | None = None
        """key -> (shape, dtype) of the global arrays: what every reply must hold (set by the first round)."""
        self.merges: list[Pairs] = []
        """Every merge of the run, in order: merge i came out of the i-th merging round."""
        self.merges_applied: dict[int, int] = {}
        """node id -> how many merges it has confirmed (by replying to a message that carried them)."""
        self._merges_sent: dict[int, int] = {}
        self.round_records: dict[int, dict[str, Any]] = {}
        """server round -> what happened: failed nodes, bad updates, aggregation metrics."""

    def summary(self) -> None:
        log(INFO, "\t├──> lorafair method: %s %s (bad updates: %s)", self.method, self.options, self.on_bad_update)
        super().summary()

    def aggregator(self, server_round: int):
        """The method's aggregator for this round: its draws are seeded by (seed, round), so a round repeats."""
        options = dict(self.options)
        if "seed" in method_options(self.method):
            options.setdefault("seed", derive_seed("server", self.seed, server_round))
        return build_aggregator(self.method, **options)

    # ---- sending ----------------------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if KEY_CLIPPING_NORM in config and method_class(self.method).merges:
            raise ValueError(f"{self.method} merges into the frozen weights outside the arrays a differential-privacy"
                             f" wrapper clips and noises; use a method without merges under differential privacy")
        if self.template is None:  # the initial arrays, never a reply, decide the global keys, shapes and rank
            self.template = {key: (tuple(array.shape), str(array.dtype)) for key, array in arrays.items()}
        return self._with_merges(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._with_merges(super().configure_evaluate(server_round, arrays, config, grid))

    def _with_merges(self, messages: Iterable[Message]) -> list[Message]:
        """Give each message its own content holding the merges its node has not confirmed."""
        messages = list(messages)
        if not method_class(self.method).merges:
            return messages
        self._merges_sent = {}
        for message in messages:
            node = message.metadata.dst_node_id
            applied = self.merges_applied.get(node, 0)
            self._merges_sent[node] = len(self.merges)
            if applied < len(self.merges):
                content = RecordDict(dict(message.content.items()))
                content[self.mergerecord_key] = merges_to_arrays(self.merges, applied)
                message.content = content
        return messages

    def _confirm_merges(self, replies: list[Message]) -> None:
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in self._merges_sent:
                self.merges_applied[node] = self._merges_sent[node]

    # ---- receiving --------------------------------------------------------------------------------------------

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        screened, malformed = self._screened(list(replies))
        valid, errors = self._check_and_log_replies(screened, is_train=True, validate=False)
        record: dict[str, Any] = {"failed_nodes": {str(m.metadata.src_node_id): m.error.reason for m in errors},
                                  "bad_updates": {}, "clients": [], "aggregation": {}}
        self.round_records[server_round] = record
        self._confirm_merges(valid)
        valid.sort(key=self._client_of)
        updates, keys, unreadable = self._updates(valid)
        malformed.update({self._client_of(valid[i]): reason for i, reason in unreadable.items()})
        valid = [m for i, m in enumerate(valid) if i not in unreadable]
        updates = [u for u in updates if u is not None]
        record["clients"] = [self._client_of(m) for m in valid]
        record["train_loss"] = {str(client): float(next(iter(m.content.metric_records.values()))["train-loss"])
                                for client, m in zip(record["clients"], valid, strict=True)
                                if "train-loss" in next(iter(m.content.metric_records.values()))}
        losses = [next(iter(m.content.metric_records.values())).get("train-loss", 0.0) for m in valid]
        bad = unusable_updates(losses, updates)
        record["bad_updates"] = {str(client): reason for client, reason in sorted(malformed.items())}
        record["bad_updates"].update({str(record["clients"][i]): reason for i, reason in sorted(bad.items())})
        bad_count = len(bad) + len(malformed)
        policy = BadUpdatePolicy(self.on_bad_update, log=None, setting="on_bad_update")
        if not policy.keeps_any(server_round, record["bad_updates"], len(valid) + len(malformed)):
            return None, None
        good = [i for i in range(len(valid)) if i not in bad]
        kept = self._clip_weights([updates[i] for i in good], [record["clients"][i] for i in good], record)
        result = self.aggregator(server_round).aggregate(kept, round_index=server_round)
        if result.merge:
            self.merges.append(result.merge)
        lora = result.lora or fresh_lora(updates[0].lora, seeded_generator("lora_reinit", self.seed, server_round))
        record["aggregation"] = dict(result.metrics)
        record.update(bytes_up=int(result.bytes_up), bytes_down=int(result.bytes_down))
        metrics = self.train_metrics_aggr_fn([valid[i].content for i in good], self.weighted_by_key)
        metrics.update({f"aggregation-{name}": float(value) for name, value in result.metrics.items()})
        metrics.update({"bad-updates": bad_count, "failed-nodes": len(errors)})
        return state_to_arrays(lora, result.extra, keys), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._confirm_merges([reply for reply in replies if not reply.has_error()])
        return super().aggregate_evaluate(server_round, replies)

    def _client_of(self, reply: Message) -> int:
        """The reply's `partition-id` metric where it has a usable one, else its node id."""
        records = list(reply.content.metric_records.values()) if not reply.has_error() else []
        partition = records[0].get("partition-id") if len(records) == 1 else None
        if isinstance(partition, int | float) and math.isfinite(partition) and partition == int(partition):
            return int(partition)
        return reply.metadata.src_node_id

    def _screened(self, replies: list[Message]) -> tuple[list[Message], dict[int, str]]:
        """(the replies fit to read, client -> why for the others): errors pass, for FedAvg to log."""
        screened, malformed = [], {}
        for reply in replies:
            problem = None if reply.has_error() else self._screen(reply)
            if problem is None:
                screened.append(reply)
            else:
                malformed[self._client_of(reply)] = f"malformed reply from node {reply.metadata.src_node_id}: {problem}"
        return screened, malformed

    def _screen(self, reply: Message) -> str | None:
        """What makes a reply unfit to aggregate, read from its records' metadata alone, or None."""
        return screen_reply(reply.content, self.template, self.weighted_by_key, self.max_examples)

    def _updates(self, replies: list[Message]) -> tuple[list[ClientUpdate | None], list[str], dict[int, str]]:
        """ClientUpdates of the replies (None for one that cannot be read), the key order of the first reply's
        ArrayRecord, and position -> why, for the replies that cannot be read."""
        updates, keys, unreadable = [], [], {}
        for position, reply in enumerate(replies):
            arrays = next(iter(reply.content.array_records.values()))
            try:
                tensors = arrays.to_torch_state_dict()
                wrong = next((key for key, tensor in tensors.items()
                              if tuple(tensor.shape) != tuple(arrays[key].shape)), None)
                if wrong is not None:
                    raise ValueError(f"array '{wrong}' holds data of shape {tuple(tensors[wrong].shape)}, not the "
                                     f"{tuple(arrays[wrong].shape)} it announces")
                lora, extra = arrays_to_state(arrays)
            except Exception as err:
                unreadable[position] = (f"malformed reply from node {reply.metadata.src_node_id}: "
                                        f"{' '.join(str(err).split())[:200]}")
                updates.append(None)
                continue
            keys = keys or list(arrays.keys())
            weight = next(iter(reply.content.metric_records.values()))[self.weighted_by_key]
            updates.append(ClientUpdate(weight=weight, lora=lora, extra=extra))
        return updates, keys, unreadable

    def _clip_weights(self, updates: list[ClientUpdate], clients: list[int], record: dict[str, Any]
                      ) -> list[ClientUpdate]:
        """The updates with every weight above max_weight_ratio x the median weight clipped to it."""
        if self.max_weight_ratio is None or not updates:
            return updates
        cap = self.max_weight_ratio * statistics.median(float(update.weight) for update in updates)
        record["clipped_weights"] = {str(client): [float(update.weight), cap]
                                     for client, update in zip(clients, updates, strict=True) if update.weight > cap}
        return [dataclasses.replace(update, weight=min(float(update.weight), cap)) for update in updates]


def screen_reply(content: RecordDict, template: dict[str, tuple[tuple[int, ...], str]] | None, count_key: str,
                 max_examples: float) -> str | None:
    """What makes a reply's content unfit to aggregate, read from its records' metadata alone, or None: one
    ArrayRecord and one MetricRecord, a positive example count `count_key` up to `max_examples`, and (given a
    `template`: key -> (shape, dtype)) exactly the template's keys in its dtypes and shapes (a LoRA factor keyed as
    peft does may have a lower rank), with no more bytes than the shapes hold."""
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} and "
                f"{len(content.metric_records)}")
    arrays, metrics = next(iter(content.array_records.values())), next(iter(content.metric_records.values()))
    count = metrics.get(count_key)
    if isinstance(count, bool) or not isinstance(count, int | float) or not math.isfinite(count) or count <= 0:
        return f"example count '{count_key}' is {count!r}, not a positive number"
    if count > max_examples:
        return f"example count {count} is above max_examples ({max_examples})"
    if not arrays:
        return "its ArrayRecord is empty"
    if template is None:
        return None
    missing, extra = sorted(template.keys() - arrays.keys()), sorted(arrays.keys() - template.keys())
    if missing or extra:
        return f"array '{(missing or extra)[0]}' is {'missing' if missing else 'not one of the global model'}"
    for key, array in arrays.items():
        shape, dtype = template[key]
        got = tuple(array.shape)
        if str(array.dtype) != dtype:
            return f"array '{key}' is {array.dtype}, the global model's is {dtype}"
        if not (got == shape or _lower_rank(key, got, shape, arrays)):
            return (f"array '{key}' has shape {got}, the global model's is {shape} (a LoRA factor may have a "
                    f"lower rank, never a higher one)")
        nbytes = math.prod(got) * torch.empty((), dtype=getattr(torch, dtype, torch.float32)).element_size()
        if len(array.data) > nbytes + 4096:  # the serialised array: its bytes plus a small header
            return f"array '{key}' carries {len(array.data)} bytes, more than its shape {got} holds"
    ranks = sorted({array.shape[0] for key, array in arrays.items() if key.endswith(PEFT_A)})
    if len(ranks) > 1:
        return f"its LoRA factors have ranks {ranks}; a client has one rank for all its layers"
    return None


def _lower_rank(key: str, got: tuple[int, ...], shape: tuple[int, ...], arrays: ArrayRecord) -> bool:
    """Whether `got` is the shape of a LoRA factor of `shape` at a lower rank, matching its partner's rank."""
    if len(got) != 2 or len(shape) != 2:
        return False
    if key.endswith(PEFT_A):
        partner = arrays.get(peft_partner(key))
        return 0 < got[0] < shape[0] and got[1] == shape[1] and partner is not None and \
            tuple(partner.shape)[1:] == (got[0],)
    if key.endswith(PEFT_B):
        partner = arrays.get(peft_partner(key))
        return 0 < got[1] < shape[1] and got[0] == shape[0] and partner is not None and \
            tuple(partner.shape)[:1] == (got[1],)
    return False


def train_metrics_without_ids(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """FedAvg's weighted mean of the train metrics every reply holds, leaving out `partition-id` (an id, not a
    measurement)."""
    stripped = []
    common = set.intersection(*(set(next(iter(content.metric_records.values())).keys()) for content in records))
    for content in records:
        metrics = next(iter(content.metric_records.values()))
        stripped.append(RecordDict({"metrics": MetricRecord({k: v for k, v in metrics.items()
                                                             if k != "partition-id" and k in common})}))
    return aggregate_metricrecords(stripped, weighted_by_key)

