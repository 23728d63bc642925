"""`LoraStrategy`: a Flower strategy (Message API) for lorafair's aggregation methods.

It is FedAvg with the averaging swapped for `lorafair.aggregation`: the same sampling, constructor arguments,
records and error handling (a node whose reply carries an error is left out of the round and logged), plus
lorafair's bad-update policy (`lorafair.federated.server.BadUpdatePolicy`: NaN/Inf updates and malformed replies
dropped and the others re-weighted, or the run stopped) and, for the methods that merge into the frozen weights
(FLoRA, FedEx-LoRA), a log of merges from which every node receives the ones it has not confirmed yet, so a node
that sat out rounds catches up exactly before it trains.

Each message's config carries the round's client rule (`lorafair.flower.records.rule_to_config`): the factors the
clients train and upload this round (RoLoRA: B in odd rounds, A in even ones, round 1 being the first) and those each
keeps as its own (FedSA-LoRA: B). A reply holds the uploaded factors (a frozen one may come back too, unchanged);
the strategy folds only the uploaded ones, as `lorafair fit` does. A kept factor never travels: the messages leave
it out, a reply that holds it is dropped, and there is no global model to evaluate on the server (`start` refuses
an `evaluate_fn`): Flower's federated evaluation scores each node's own model instead. Refused (`strategy_refusal`):
a method whose LoRA starts from the SVD of the frozen weights or of a gradient, one whose clients prune their own
rank, and one whose clients train a local adapter of their own; `lorafair flower` (`lorafair.flower.app`) runs all
four, its own ServerApp and ClientApp making the start before round 1 and doing the clients' part.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from lorafair.aggregation import (
    ClientRule,
    ClientUpdate,
    build_aggregator,
    method_class,
    method_options,
    registered_methods,
)
from lorafair.federated.server import BadUpdatePolicy, unusable_updates
from lorafair.flower.records import (
    KEPT_ROUND,
    merges_to_arrays,
    rule_keys,
    rule_to_config,
    state_to_arrays,
)
from lorafair.keys import PEFT_A, PEFT_B, Pairs, peft_partner, unpack_peft
from lorafair.seeds import derive_seed, fresh_lora, seeded_generator


def strategy_refusal(method: str, options: dict[str, Any] | None = None) -> str | None:
    """Why `LoraStrategy` cannot run `method`, from its traits and client rule, or None: a start made before round 1
    (the SVD of the frozen weights or of the clients' gradient), rank self-pruning or a local adapter, which lorafair's
    own ServerApp and ClientApp (`lorafair flower`) do and the strategy's rounds, answered by a user's ClientApp, do
    not."""
    aggregator = build_aggregator(method, **(options or {}))
    if aggregator.starts_from_weights:
        return (f"{method} cannot run in LoraStrategy: its LoRA starts from the SVD of the frozen weights, taken out "
                "of them on every node before round 1, which the strategy does not send; run it with lorafair flower "
                "(lorafair's own ServerApp and ClientApp) or lorafair fit")
    if aggregator.starts_from_gradient:
        return (f"{method} cannot run in LoraStrategy: its LoRA starts from the SVD of a gradient every client "
                "takes before round 1, an exchange the strategy does not make; run it with lorafair flower "
                "(lorafair's own ServerApp and ClientApp) or lorafair fit")
    if aggregator.self_prunes:
        return (f"{method} with rank self-pruning (server.prune_gamma below 1) cannot run in LoraStrategy: its "
                "clients add a penalty to their loss and lower their own rank, which only lorafair's own ClientApp "
                "does; run it with lorafair flower, or leave prune_gamma at 1")
    if aggregator.client_rule(1).local or aggregator.client_rule(2).local:
        return (f"{method} cannot run in LoraStrategy: its clients train a local adapter of their own before the "
                "shared pair and mix the two per input at evaluation, which only lorafair's own ClientApp does; run "
                "it with lorafair flower")
    return None


def round_keys(rule: ClientRule, layers: list[str], extra: list[str]) -> tuple[set[str], set[str]]:
    """(the keys a reply of a round of `rule` must leave out: the factors and extra tensors clients keep; those it
    may leave out: the factors it neither uploads nor keeps, which the server holds)."""
    kept = set(rule_keys(rule.keeps, layers)) | (set(extra) if rule.keeps_extra else set())
    unsent = "".join(factor for factor in "AB" if factor not in rule.sends and factor not in rule.keeps)
    return kept, set(rule_keys(unsent, layers))


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
    `weighted_by_key`. The config of every message names the round's client rule (`lorafair.trains`,
    `lorafair.sends`, `lorafair.keeps`, `lorafair.keeps-extra`): a reply may leave out the factors it does not
    upload and must leave out those it keeps; where clients keep factors, `lorafair.kept-round` names the last round
    whose update of the node the strategy kept (a node whose later update was dropped goes back to what it held).
    An optional `partition-id` metric orders the clients in the aggregation (else node id), so results do not
    depend on the order replies arrive in.

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
        refusal = strategy_refusal(method, self.options)
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
        self.initial: dict[str, torch.Tensor] = {}
        """The initial arrays: a factor clients keep stays the initial one in the server's state (it never sees
        theirs)."""
        self.round_state: dict[str, torch.Tensor] = {}
        """The full state of the round being trained, whose factors fill in those a reply does not upload."""
        self.kept_rounds: dict[int, int] = {}
        """node id -> the last round whose update of that node was aggregated."""
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

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """FedAvg's `start`; an `evaluate_fn` is refused where clients keep factors the server never sees."""
        rule = self.client_rule(1)
        if evaluate_fn is not None and rule.personal:
            raise ValueError(f"{self.method}: each client keeps its own {rule.keeps or 'head'}, which never reaches "
                             "the server, so there is no global model for evaluate_fn to score; leave evaluate_fn out: "
                             "Flower's federated evaluation (fraction_evaluate) scores each node's own model")
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)

    def client_rule(self, server_round: int) -> ClientRule:
        """What the clients train, upload and keep in round `server_round` (1, 2, ..., as `lorafair fit` counts)."""
        return self.aggregator(server_round).client_rule(server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if KEY_CLIPPING_NORM in config and method_class(self.method).merges:
            raise ValueError(f"{self.method} merges into the frozen weights outside the arrays a differential-privacy"
                             f" wrapper clips and noises; use a method without merges under differential privacy")
        if self.template is None:  # the initial arrays, never a reply, decide the global keys, shapes and rank
            self.template = {key: (tuple(array.shape), str(array.dtype)) for key, array in arrays.items()}
            self.initial = arrays.to_torch_state_dict()
        rule = self.client_rule(server_round)
        arrays, self.round_state = self._without_kept(arrays, rule)
        config.update(rule_to_config(rule))
        return self._with_kept_round(self._with_merges(super().configure_train(server_round, arrays, config, grid)),
                                     rule)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Each node evaluates the model it would start the next round from: with the factors it keeps, its own."""
        rule = self.client_rule(server_round + 1)
        arrays, _ = self._without_kept(arrays, rule)
        config.update(rule_to_config(rule))
        return self._with_kept_round(self._with_merges(super().configure_evaluate(server_round, arrays, config, grid)),
                                     rule)

    def _kept_keys(self, rule: ClientRule) -> tuple[set[str], set[str]]:
        """`round_keys` of the global model's keys."""
        keys = list(self.template or {})
        layers = [key[: -len(PEFT_A)] for key in keys if key.endswith(PEFT_A)]
        extra = [key for key in keys if not key.endswith((PEFT_A, PEFT_B))]
        return round_keys(rule, layers, extra)

    def _without_kept(self, arrays: ArrayRecord, rule: ClientRule) -> tuple[ArrayRecord, dict[str, torch.Tensor]]:
        """(the arrays to send: those given without what the clients keep; the full state of the round, the
        initial tensors in place of those kept, where the rule has clients upload less than everything, else {})."""
        if rule.sends == "AB" and not rule.personal:
            return arrays, {}
        kept, _ = self._kept_keys(rule)
        tensors = arrays.to_torch_state_dict()
        full = {key: tensors[key] if key in tensors else self.initial[key] for key in self.template or {}}
        return ArrayRecord(torch_state_dict={k: t for k, t in tensors.items() if k not in kept}), full

    def _with_kept_round(self, messages: Iterable[Message], rule: ClientRule) -> list[Message]:
        """Where clients keep factors, give each message its own config naming the last round whose update of its
        node was aggregated."""
        messages = list(messages)
        if not rule.personal:
            return messages
        for message in messages:
            content = RecordDict(dict(message.content.items()))
            config = ConfigRecord(dict(content[self.configrecord_key].items()))
            config[KEPT_ROUND] = self.kept_rounds.get(message.metadata.dst_node_id, 0)
            content[self.configrecord_key] = config
            message.content = content
        return messages

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
        rule = self.client_rule(server_round)
        screened, malformed = self._screened(list(replies), rule)
        valid, errors = self._check_and_log_replies(screened, is_train=True, validate=False)
        record: dict[str, Any] = {"failed_nodes": {str(m.metadata.src_node_id): m.error.reason for m in errors},
                                  "bad_updates": {}, "clients": [], "aggregation": {}}
        self.round_records[server_round] = record
        self._confirm_merges(valid)
        valid.sort(key=self._client_of)
        updates, unreadable = self._updates(valid)
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
        self.kept_rounds.update({valid[i].metadata.src_node_id: server_round for i in good})
        if result.merge:
            self.merges.append(result.merge)
        lora = result.lora or fresh_lora(updates[0].lora, seeded_generator("lora_reinit", self.seed, server_round))
        record["aggregation"] = dict(result.metrics)
        record.update(bytes_up=int(result.bytes_up), bytes_down=int(result.bytes_down))
        metrics = self.train_metrics_aggr_fn([valid[i].content for i in good], self.weighted_by_key)
        metrics.update({f"aggregation-{name}": float(value) for name, value in result.metrics.items()})
        metrics.update({"bad-updates": bad_count, "failed-nodes": len(errors)})
        kept_keys, _ = self._kept_keys(rule)
        order = [key for key in self.template if key not in kept_keys] if self.template else None
        return state_to_arrays(lora, result.extra, order), metrics

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

    def _screened(self, replies: list[Message], rule: ClientRule) -> tuple[list[Message], dict[int, str]]:
        """(the replies fit to read in a round of `rule`, client -> why for the others): errors pass, for FedAvg to
        log."""
        kept, unsent = self._kept_keys(rule)
        screened, malformed = [], {}
        for reply in replies:
            problem = None if reply.has_error() else screen_reply(reply.content, self.template, self.weighted_by_key,
                                                                  self.max_examples, kept, unsent)
            if problem is None:
                screened.append(reply)
            else:
                malformed[self._client_of(reply)] = f"malformed reply from node {reply.metadata.src_node_id}: {problem}"
        return screened, malformed

    def _updates(self, replies: list[Message]) -> tuple[list[ClientUpdate | None], dict[int, str]]:
        """ClientUpdates of the replies (None for one that cannot be read; a factor a reply leaves out is the
        round's), and position -> why, for the replies that cannot be read."""
        updates, unreadable = [], {}
        for position, reply in enumerate(replies):
            arrays = next(iter(reply.content.array_records.values()))
            try:
                tensors = arrays.to_torch_state_dict()
                wrong = next((key for key, tensor in tensors.items()
                              if tuple(tensor.shape) != tuple(arrays[key].shape)), None)
                if wrong is not None:
                    raise ValueError(f"array '{wrong}' holds data of shape {tuple(tensors[wrong].shape)}, not the "
                                     f"{tuple(arrays[wrong].shape)} it announces")
                tensors = {**{key: self.round_state[key] for key in self.round_state if key not in tensors}, **tensors}
                lora, extra = unpack_peft({key: tensors[key] for key in self.template or tensors if key in tensors})
            except Exception as err:
                unreadable[position] = (f"malformed reply from node {reply.metadata.src_node_id}: "
                                        f"{' '.join(str(err).split())[:200]}")
                updates.append(None)
                continue
            weight = next(iter(reply.content.metric_records.values()))[self.weighted_by_key]
            updates.append(ClientUpdate(weight=weight, lora=lora, extra=extra))
        return updates, unreadable

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
                 max_examples: float, kept: set[str] = frozenset(), unsent: set[str] = frozenset()) -> str | None:
    """What makes a reply's content unfit to aggregate, read from its records' metadata alone, or None: one
    ArrayRecord and one MetricRecord, a positive example count `count_key` up to `max_examples`, and (given a
    `template`: key -> (shape, dtype)) exactly the template's keys in its dtypes and shapes (a LoRA factor keyed as
    peft does may have a lower rank), with no more bytes than the shapes hold, less the `kept` keys (what clients
    keep: never sent) and less any of the `unsent` ones (factors the round does not upload)."""
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
    leaked = sorted(arrays.keys() & kept)
    if leaked:
        return f"array '{leaked[0]}' is what each client keeps as its own this round: it must not be sent"
    missing, extra = sorted(template.keys() - arrays.keys() - kept - unsent), sorted(arrays.keys() - template.keys())
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

