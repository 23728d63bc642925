"""The job of `lorafair fit` as a Flower ClientApp and ServerApp: Flower is one more transport of the round loop.

The ClientApp is the client role (`LocalTrainer.train`: the same LightningModule, local loop and seeds derived from
(seed, round, client)) on the one client its node's `partition-id` names, holding only that client's data. The
ServerApp is `fit`'s round loop (`FederatedTrainer`) with its local training replaced by messages to the
nodes: the same sampling, server role (bad-update policy and aggregation), evaluation, results.json, TensorBoard,
checkpoints and resume. Messages carry the named tensors of `lorafair.keys` in ArrayRecords. A node whose
reply is an error (it failed mid-round) is left out of the round and named in results.json.

FLoRA, FedEx-LoRA and FRLoRA merge into the frozen weights. The server keeps the run's merges; a node keeps its
frozen weights and the count of merges it applied in its node state, and each message carries the merges its node
has not confirmed yet, so a node that sat out rounds catches up exactly. FRLoRA's start (each layer's top-r SVD taken
out of its frozen weight) is the run's first merge, (A0, -B0) of rank r, and every message carries (A0, B0), which
each node restarts from. A resumed run sends each node the checkpoint's frozen weights once.

Fed-SB's start is cut from the clients' gradient: before round 1 (and again on resume: the basis is not
checkpointed) the server sends every node one `GRADIENT_QUERY` message with the run's fresh LoRA; the node replies
with its client's gradient of the loss at each adapted layer's frozen weight (float64), and the server weights the
replies by sample count, sums them in client order and cuts the start as `fit` does. The start needs every client:
a node that fails or replies malformed there stops the run with one line naming it. Every round's message then
carries the fixed rows A0 (`BASIS`), over which the node trains the core R of A = R A0.

Each message's config carries the round's client rule (`lorafair.flower.records.rule_to_config`): a node trains the
factors it names (RoLoRA: B in odd rounds, A in even ones) and uploads only those it sends. Where clients keep
tensors of their own, they never travel: a node keeps them in its node state (`own_tensors`, `hold_pending`),
starting from the run's initial ones, and after each evaluated round every node scores its own model on its domain's
test set (an evaluate message), the run's personalised scores. Where they are factors or the head (FedSA-LoRA: B),
the server, which never sees them, has no global model to score or export, and reports it as not available; a
local adapter alone (FedDPA: a second LoRA pair and the summary of the node's training inputs, which it trains
first, with `LocalAdapter`'s settings from the message's config) is no part of the global model, which the server
scores and exports as `fit` does.

Where the method's clients prune their own rank (HetLoRA with prune_gamma below 1), a node trains with the method's
penalty, decides the rank it keeps (`lorafair.federated.loop.prune_update`), uploads its update at that rank and
announces it (`RANK`); the server takes a reply at the announced rank, no higher than the client's, and lowers the
client's rank once the round keeps its update, as `fit` does. So every method runs here; `LoraStrategy`, whose nodes
are a user's own ClientApp, refuses those four (`lorafair.flower.strategy.strategy_refusal`).

    lorafair flower --config demo                   # simulation engine, one process
    flwr run flower-app SUPERLINK                   # deployment engine (docs/federation.md)
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch.utils.data import Dataset

from lorafair.aggregation import Aggregator, ClientRule, ClientUpdate, build_aggregator, method_class, ranks
from lorafair.config import FitConfig, metric_name
from lorafair.config_parse import parse_fit_config
from lorafair.data import Client, build_client_data, build_federated_data, model_data_config
from lorafair.errors import UserError
from lorafair.export import export_final
from lorafair.federated import faults
from lorafair.federated.client import EVALUATION_SUMS, LocalTrainer
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer, prune_update
from lorafair.federated.run_folder import EXPORT_NAME, GLOBAL_MODEL, own_run_folder, results_path
from lorafair.federated.server import aggregator_options
from lorafair.federated.state import (
    ClientResult,
    GlobalState,
    RoundRecord,
    Scores,
    ServerAnswer,
    is_local,
    kept_tensors,
)
from lorafair.flower.records import KEPT_ROUND, hold_pending, own_tensors, rule_of_config, rule_to_config
from lorafair.flower.strategy import screen_reply
from lorafair.keys import Pairs, merge_indices, merge_kind, pack, pack_pairs, pair_key, unpack, unpack_pairs
from lorafair.models.build import build_model
from lorafair.seeds import fresh_lora, seeded_generator

MERGES, BASE, APPLIED = "lorafair.merges", "lorafair.base", "lorafair.applied"
"""Message records of the merges a node has not applied and of the resumed frozen weights; the node state record of
how many merges it applied."""
RANK = "lora-rank"
"""The config entry of a message (the client's LoRA rank) and, where clients prune their own rank, the metric of a
train reply (the rank the node kept: its update's)."""
GRADIENT_QUERY, GRADIENT, INIT_BATCHES = f"{MessageType.QUERY}.gradient", "lorafair.gradient", "lorafair.init-batches"
"""A start cut from the clients' gradient (Fed-SB): the message type of the server's one request to every node before
round 1, the record of a node's reply (layer -> its gradient) and the config key of how many batches it takes."""
BASIS = "lorafair.basis"
"""Message record, where clients train the core of A (Fed-SB): layer -> the fixed rows A0 it trains over."""
DEFAULT_TIMEOUT = 600.0
"""Seconds the server waits for the nodes to connect and for a round's replies."""
NO_GLOBAL_MODEL = ("not available under Flower: each client keeps its own {kept}, which never reaches the server, so "
                   "there is no global model to score or export; the personalised scores are each node's own model "
                   "on its own domain (lorafair fit also scores the global model, with the mean of the clients' "
                   "{kept})")
"""What results.json and the console say of the global model where clients keep factors or the head of their own."""


# ---- the client role ------------------------------------------------------------------------------------------

@dataclass
class NodeRole:
    """One model per process and config (a simulation worker hosts every node in turn) and what every node of the
    run starts from; a node's own frozen weights and factors live in its node state."""

    trainer: LocalTrainer
    pristine: dict[str, torch.Tensor]
    """The pristine frozen weights."""
    start: GlobalState
    """The run's starting model (the `fit` round loop's): what a node keeps before it first trained."""
    method: Aggregator
    """The run's method, for the clients' part beyond the round's rule: the penalty and the rank a client keeps
    where it prunes its own rank."""


_ROLES: dict[str, NodeRole] = {}
_CLIENTS: dict[tuple[str, int], tuple[Client, Dataset | None]] = {}


def node_role(cfg: FitConfig, partition: int) -> tuple[NodeRole, Client, Dataset | None]:
    """This process's client role for `cfg`, and the data of client `partition` only: its training data and its
    domain's test set."""
    key = repr(cfg)
    if (key, partition) not in _CLIENTS:
        data_config = model_data_config(cfg.model, cfg.data.image_size)
        client, classes, test = build_client_data(cfg.data, cfg.federation, cfg.seed, data_config, partition)
        _CLIENTS[key, partition] = client, test
        if key not in _ROLES:
            fabric = launch_fabric(cfg, tensorboard=False)
            model = build_model(cfg, len(classes), fabric.device)
            start = GlobalState(fresh_lora(model.get_lora(), seeded_generator("lora_init", cfg.seed)),
                                {name: tensor.detach().clone() for name, tensor in model.get_extra().items()})
            _ROLES[key] = NodeRole(LocalTrainer(model, fabric, cfg.client, cfg.data, cfg.seed, show_progress=False),
                                   model.base_state(), start,
                                   build_aggregator(cfg.server.method, **aggregator_options(cfg.server, cfg.seed)))
    return (_ROLES[key], *_CLIENTS[key, partition])


def node_start(role: NodeRole, msg: Message, context: Context) -> GlobalState:
    """The model this node trains (or scores) from: the message's, with what its rule keeps in place and its local
    adapter, the node's own (`own_tensors`; before it first trained, the run's initial ones)."""
    tensors, config = msg.content["arrays"].to_torch_state_dict(), msg.content["config"]
    rule = rule_of_config(config)
    if not rule.personal:
        return GlobalState.from_tensors(tensors)
    rank = int(config[RANK])
    start = GlobalState({name: ranks.to_client(pair, rank) for name, pair in role.start.lora.items()},
                        role.start.extra)
    own = own_tensors(context.state, config, start.kept(rule, rank))
    return replace(GlobalState.from_tensors({**tensors, **own}),
                   local={key: tensor for key, tensor in own.items() if is_local(key)})


def uploaded(update: ClientUpdate, rule: ClientRule) -> dict[str, torch.Tensor]:
    """What a node sends of its update: the factors its rule uploads and the extra tensors, unless it keeps them."""
    tensors = {pair_key("lora", name, factor): pair["AB".index(factor)] for name, pair in update.lora.items()
               for factor in rule.sends}
    return {**tensors, **({} if rule.keeps_extra else pack("extra", update.extra))}


def catch_up(trainer: LocalTrainer, pristine: dict[str, torch.Tensor], msg: Message, context: Context) -> None:
    """Put this node's frozen weights in the model: its own (the pristine ones, or the resumed ones the message
    carries) after the merges it has not applied yet; keep them and the count in the node state."""
    state = context.state
    if BASE in msg.content:
        base, applied = msg.content[BASE].to_torch_state_dict(), 0
    else:
        base = state[BASE].to_torch_state_dict() if BASE in state else pristine
        applied = int(state[APPLIED]["count"]) if APPLIED in state else 0
    trainer.model.load_base_state(base)
    pending = pending_merges(msg.content[MERGES].to_torch_state_dict(), applied)
    for merge in pending:
        trainer.model.merge(merge)
    state[BASE] = to_arrays(trainer.model.base_state())
    state[APPLIED] = ConfigRecord({"count": applied + len(pending)})


def train(cfg: FitConfig, msg: Message, context: Context) -> Message:
    """Train this node's client from the global state in `msg` (with what it keeps of its own) by the round's client
    rule (over the message's fixed rows A0, where it trains A's core; with its method's penalty, where it prunes its
    own rank); reply with the factors it uploads and its statistics (and the rank it kept), and hold what it keeps."""
    role, client, _ = node_role(cfg, int(context.node_config["partition-id"]))
    if method_class(cfg.server.method).merges:
        catch_up(role.trainer, role.pristine, msg, context)
    config = msg.content["config"]
    rule, round_index = rule_of_config(config), int(config["server-round"])
    start = node_start(role, msg, context)
    faults.maybe_raise_in_client(round_index, client.id)
    device = role.trainer.fabric.device
    basis = ({name: rows.to(device) for name, rows in msg.content[BASIS].to_torch_state_dict().items()}
             if BASIS in msg.content else None)
    rank, method = int(config[RANK]), role.method
    result = role.trainer.train(client, start, round_index, rank, factors=rule.trains, basis=basis,
                                penalty=method.client_penalty if method.self_prunes else None, local=rule.local)
    kept_rank = {RANK: prune_update(method, result, start, rank)} if method.self_prunes else {}
    if rule.personal:
        hold_pending(context.state, round_index,
                     {**kept_tensors(result.update.lora, result.update.extra, rule), **result.local})
    metrics = MetricRecord({"num-examples": int(result.update.weight), "train-loss": float(result.train_loss),
                            "steps": result.steps, "skipped-images": result.skipped_images, **kept_rank})
    return Message(RecordDict({"arrays": to_arrays(uploaded(result.update, rule)), "metrics": metrics}),
                   reply_to=msg)


def evaluate(cfg: FitConfig, msg: Message, context: Context) -> Message:
    """Score this node's own model (the message's global state with what it keeps of its own; a local adapter mixed
    in per input) on its domain's test set; reply with the evaluation sums and the per-item scores
    (`LocalTrainer.evaluation_sums`)."""
    role, client, test = node_role(cfg, int(context.node_config["partition-id"]))
    if test is None:
        raise UserError(f"client {client.id} is drawn from every domain (iid partition): it has no domain of its own "
                        "to score its own model on; use partition feature or feature_label")
    config = msg.content["config"]
    sums, items = role.trainer.evaluation_sums(node_start(role, msg, context), [test], (0, 1), int(config[RANK]),
                                               rule_of_config(config).local)
    scores = to_arrays({"sums": sums, "items": items[0]})
    return Message(RecordDict({"scores": scores, "metrics": MetricRecord({"num-examples": len(test)})}),
                   reply_to=msg)


def gradient(cfg: FitConfig, msg: Message, context: Context) -> Message:
    """This node's client's share of a start cut from the gradient (Fed-SB): the gradient of the loss at each adapted
    layer's frozen weight, for the model the message carries, on the config's number of batches of its own data
    (`LocalTrainer.weight_gradient`, float64), with its example count; the server weights the shares by it and sums
    them. LORAFAIR_CLIENT_ERROR's round 0 makes this step fail."""
    role, client, _ = node_role(cfg, int(context.node_config["partition-id"]))
    faults.maybe_raise_in_client(0, client.id)
    start = GlobalState.from_tensors(msg.content["arrays"].to_torch_state_dict())
    shares = role.trainer.weight_gradient(client, start, int(msg.content["config"][INIT_BATCHES]))
    metrics = MetricRecord({"num-examples": client.num_samples})
    return Message(RecordDict({GRADIENT: to_arrays(shares), "metrics": metrics}), reply_to=msg)


def make_client_app(config_of: Callable[[Context], FitConfig]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(config_of(context), msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(config_of(context), msg, context)

    @app.query()
    def _partition(msg: Message, context: Context) -> Message:
        partition = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
        return Message(RecordDict({"metrics": partition}), reply_to=msg)

    @app.query(GRADIENT_QUERY.split(".")[1])
    def _gradient(msg: Message, context: Context) -> Message:
        return gradient(config_of(context), msg, context)

    return app


# ---- the server role ------------------------------------------------------------------------------------------

class FlowerRoundLoop(FederatedTrainer):
    """`fit`'s round loop in one process, whose clients train on the grid's nodes."""
    def __init__(self, cfg: FitConfig, grid: Grid, timeout: float) -> None:
        if cfg.federation.setting != "federated":
            raise UserError(f"federation.setting {cfg.federation.setting} is a bound for `lorafair fit` and "
                            f"`lorafair compare`; Flower runs federated methods only")
        super().__init__(cfg, launch_fabric(cfg), export=export_final)
        self.grid, self.timeout = grid, timeout
        self.node_of: dict[int, int] = {}
        self.merges: list[Pairs] = []
        """The merges of this server process, in order."""
        self.merges_applied: dict[int, int] = {}
        """Client id -> how many of `merges` its node confirmed (by replying to a message carrying them)."""
        self.resumed_base: dict[str, torch.Tensor] = {}
        self.failed: dict[str, str] = {}
        self.malformed: dict[str, str] = {}
        """Client id -> why its reply was dropped (wrong keys, shapes or dtypes, a bad count, missing metrics)."""
        self.round_clients: list[int] = []
        """The clients whose replies of the round being run were read."""
        self.kept_rounds: dict[int, int] = {}
        """Client id -> the last round whose update of it the server kept (what its node keeps follows it)."""
        rules = [self.client_rule(1), self.client_rule(2)]
        self.nodes_keep_state = any(rule.personal for rule in rules)
        """Whether clients keep tensors of their own (factors, head or a local adapter) in their nodes' state."""
        kept = next((rule for rule in rules if rule.keeps or rule.keeps_extra), None)
        self.no_global_model = None if kept is None else NO_GLOBAL_MODEL.format(kept=kept.keeps or "head")
        """Why there is no global model, where clients keep factors or the head of their own; else None (a local
        adapter is no part of the global model)."""
        if self.no_global_model is not None:  # in every checkpoint, which holds no global model either
            self.outputs.results[GLOBAL_MODEL] = self.no_global_model

    def start_or_resume(self) -> int:
        first = super().start_or_resume()
        if first > 1 and self.nodes_keep_state:
            raise UserError(f"{self.cfg.server.method} cannot resume under Flower: what each client keeps of its own "
                            f"lives in its node's state, which a new Flower run starts empty; start the run afresh "
                            f"(another out_dir, or --overwrite true) or resume it with lorafair fit")
        if self.merged and first > 1:
            self.resumed_base = self.model.base_state()
        self.node_of = partition_nodes(self.grid, len(self.data.clients), self.timeout)
        aggregator = self.server.aggregator
        if aggregator.starts_from_weights and first == 1:  # the merge `start_from_weights` made, the nodes' first
            self.merges = [{name: (lora_a, -lora_b) for name, (lora_a, lora_b) in self.global_state.lora.items()}]
        if aggregator.starts_from_gradient:  # on resume too, as in fit: the basis is not checkpointed
            self.initial_state = self.cut_gradient_start(self.gradient_of_nodes(aggregator.init_batches))
            if first == 1:
                self.global_state = self.initial_state
        return first

    def start_from_gradient(self, batches: int) -> GlobalState:
        """Nothing yet: the gradient comes from the nodes, known once they have connected (`start_or_resume`, which
        takes it at the run's fresh LoRA, kept as the initial state until then)."""
        return self.global_state

    def gradient_of_nodes(self, batches: int) -> dict[str, torch.Tensor]:
        """The sample-weighted mean over every client of the gradient of the loss at each adapted layer's frozen
        weight, each client's share taken by its node (`gradient`) on `batches` batches of its data at the run's
        fresh LoRA, summed in client order as `fit` sums them. The start needs every client: a node that fails,
        does not answer or replies malformed stops the run with one UserError naming it."""
        clients = [client.id for client in self.data.clients]
        content = {"arrays": to_arrays(self.initial_state.tensors()), "config": ConfigRecord({INIT_BATCHES: batches})}
        replies = self.grid.send_and_receive([Message(RecordDict(content), message_type=GRADIENT_QUERY,
                                                      dst_node_id=self.node_of[client]) for client in clients],
                                             timeout=self.timeout)
        client_of = {node: client for client, node in self.node_of.items()}
        by_client = {client_of[reply.metadata.src_node_id]: reply for reply in replies}
        weights = self.model.frozen_weights()
        template = {name: (tuple(weight.shape), "float64") for name, weight in weights.items()}
        total = sum(self.participants[client].num_samples for client in clients)
        gradient = {name: torch.zeros(weight.shape, dtype=torch.float64, device=self.fabric.device)
                    for name, weight in weights.items()}
        for client in clients:
            count = self.participants[client].num_samples
            shares, problem = gradient_shares(by_client.get(client), template, count, self.timeout)
            if problem is not None:
                raise UserError(f"{self.cfg.server.method}'s start: client {client} (node {self.node_of[client]}) "
                                f"gave no gradient ({problem}); the start is cut from every client's gradient, so the "
                                "run cannot start: fix or restart that node and run again")
            for name, share in shares.items():
                gradient[name] += share.to(self.fabric.device) * (count / total)
        return gradient

    def train_clients(self, round_index: int, sampled: list[int],
                      steps: int | None = None) -> tuple[list[ClientResult], dict[str, int], float]:
        """Send the round to the sampled clients' nodes and collect their results; client id -> node id. `steps`
        is always None here: it is set only for the centralized bound, which Flower does not run."""
        rule = self.client_rule(round_index)
        replies = self.grid.send_and_receive([self.message(round_index, client, rule, MessageType.TRAIN)
                                              for client in sampled], timeout=self.timeout)
        trained = time.perf_counter()
        client_of = {node: client for client, node in self.node_of.items()}
        results, self.failed = [], {str(client): f"no reply within {self.timeout:.0f} s" for client in sampled}
        self.malformed, self.pruned = {}, {}
        for reply in replies:
            client = client_of[reply.metadata.src_node_id]
            if reply.has_error():
                self.failed[str(client)] = reply.error.reason
                continue
            del self.failed[str(client)]
            self.merges_applied[client] = len(self.merges)
            rank, problem = self.reply_rank(client, reply)
            template, kept, unsent = self.reply_template(client, rule, rank)
            if problem is None:
                problem = screen_reply(reply.content, template, "num-examples",
                                       self.participants[client].num_samples, kept, unsent)
            result = None
            try:
                result = result_of(client, reply, self.held(client, kept | unsent)) if problem is None else None
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                problem = f"unreadable: {' '.join(str(err).split())[:200]}"
            if result is None:
                self.malformed[str(client)] = f"malformed reply from node {reply.metadata.src_node_id}: {problem}"
                continue
            if rank < self.client_ranks[client]:
                self.pruned[client] = rank
            results.append(result)
        results.sort(key=lambda result: result.client)
        self.round_clients = [result.client for result in results]
        return results, {str(result.client): self.node_of[result.client] for result in results}, trained

    def reply_rank(self, client: int, reply: Message) -> tuple[int, str | None]:
        """The LoRA rank `client`'s train reply must hold: its rank or, where the method's clients prune their own,
        the rank its node announces (`RANK`), from 1 up to its rank; with why the announcement is unfit, or None."""
        rank = self.client_ranks[client]
        if not self.server.aggregator.self_prunes:
            return rank, None
        metrics = reply.content.metric_records.get("metrics")
        announced = None if metrics is None else metrics.get(RANK)
        if isinstance(announced, bool) or not isinstance(announced, int) or not 1 <= announced <= rank:
            return rank, f"its metric '{RANK}' is {announced!r}, not the client's LoRA rank {rank} or a lower one"
        return announced, None

    def message(self, round_index: int, client: int, rule: ClientRule, message_type: str) -> Message:
        """The message of a round (or of the evaluation after it) to `client`'s node: the global state, the round's
        client rule in its config and, where clients keep factors of their own, the state at the client's rank
        without them and the last round whose update of the client the server kept."""
        config = {"server-round": round_index, RANK: self.client_ranks[client], **rule_to_config(rule)}
        tensors = self.global_state.tensors()
        if rule.personal:
            rank = self.client_ranks[client]
            tensors = {key: tensor for key, tensor in GlobalState(self.global_state.lora_for(rank),
                                                                  self.global_state.extra).tensors().items()
                       if key not in kept_keys(self.global_state, rule)}
            config[KEPT_ROUND] = self.kept_rounds.get(client, 0)
        content = RecordDict({"arrays": to_arrays(tensors), "config": ConfigRecord(config)})
        if rule.core:
            content[BASIS] = to_arrays(self.basis)
        if method_class(self.cfg.server.method).merges:
            if client not in self.merges_applied and self.resumed_base:
                content[BASE] = to_arrays(self.resumed_base)
            start = self.merges_applied.get(client, 0)
            content[MERGES] = to_arrays({key: tensor for index in range(start, len(self.merges))
                                         for key, tensor in pack_pairs(merge_kind(index), self.merges[index]).items()})
        return Message(content, message_type=message_type, dst_node_id=self.node_of[client])

    def reply_template(self, client: int, rule: ClientRule, rank: int) -> tuple[
            dict[str, tuple[tuple[int, ...], str]], set[str], set[str]]:
        """(key -> (shape, dtype) of the update `client` may send: the global LoRA pairs at `rank` (`reply_rank`)
        and the extra tensors; the keys of what the rule keeps, which it must not send; those of the factors the rule
        neither uploads nor keeps, which it may leave out)."""
        template = {}
        for name, (lora_a, lora_b) in self.global_state.lora.items():
            template[pair_key("lora", name, "A")] = ((rank, lora_a.shape[1]), _dtype(lora_a))
            template[pair_key("lora", name, "B")] = ((lora_b.shape[0], rank), _dtype(lora_b))
        template.update({key: (tuple(tensor.shape), _dtype(tensor))
                         for key, tensor in pack("extra", self.global_state.extra).items()})
        frozen = "".join(factor for factor in "AB" if factor not in rule.sends and factor not in rule.keeps)
        unsent = {pair_key("lora", name, factor) for name in self.global_state.lora for factor in frozen}
        return template, kept_keys(self.global_state, rule), unsent

    def held(self, client: int, keys: set[str]) -> dict[str, torch.Tensor]:
        """The server's tensors of `keys` at `client`'s rank, in place of those its reply leaves out: a frozen
        factor is the server's; a kept one the server never sees, and its own stands in (the fold takes neither)."""
        state = GlobalState(self.global_state.lora_for(self.client_ranks[client]), self.global_state.extra)
        return {key: tensor for key, tensor in state.tensors().items() if key in keys}

    def aggregate(self, round_index: int, results: list[ClientResult], sampled: list[int],
                  unreadable: dict[str, str] | None = None) -> ServerAnswer:
        """The round loop's answer, with the malformed replies as bad updates under its policy and the failed nodes
        in the record."""
        answer = super().aggregate(round_index, results, sampled, {**self.malformed, **(unreadable or {})})
        answer.record.failed_clients = dict(sorted(self.failed.items(), key=lambda item: int(item[0])))
        return answer

    def apply(self, round_index: int, answer: ServerAnswer) -> None:
        super().apply(round_index, answer)
        if answer.record.skipped:
            return
        self.kept_rounds.update({client: round_index for client in self.round_clients
                                 if str(client) not in answer.record.bad_updates})
        if answer.merge:
            self.merges.append(answer.merge)

    def evaluate(self, round_index: int) -> tuple[Scores | None, Scores | None]:
        """`fit`'s evaluation; where clients keep tensors of their own, the global model's scores (none where they
        keep factors or the head: the server never sees those) and the personalised ones from the nodes: every
        client's node scores its own model on its domain's test set, and a domain's score is the mean over its
        clients, as in `fit`. A node that does not answer is left out (a domain none of whose nodes answered scores
        NaN)."""
        rule = self.client_rule(round_index + 1)
        if not rule.personal:
            return super().evaluate(round_index)
        scores = None if self.no_global_model is not None else self.score([(self.global_state, None,
                                                                            self.data.domains)])
        clients = [client.id for client in self.data.clients]
        replies = self.grid.send_and_receive([self.message(round_index, client, rule, MessageType.EVALUATE)
                                              for client in clients], timeout=self.timeout)
        client_of = {node: client for client, node in self.node_of.items()}
        scored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for reply in replies:
            client = client_of[reply.metadata.src_node_id]
            domain = self.data.clients[client].domain
            try:
                if reply.has_error():
                    raise ValueError(reply.error.reason)
                tensors = reply.content["scores"].to_torch_state_dict()
                sums, items = tensors["sums"].to(torch.float64), tensors["items"].to(torch.float64)
                if sums.shape != (1, EVALUATION_SUMS) or items.shape != (len(self.data.test[domain]),):
                    raise ValueError(f"scores of shapes {tuple(sums.shape)} and {tuple(items.shape)}")
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                reason = " ".join(str(err).split())[:200]
                self.fabric.print(f"warning: round {round_index}: client {client} scored no personalised model "
                                  f"({reason})")
                continue
            scored[client] = sums, items
        if not scored:
            raise UserError(f"round {round_index}: no node scored its own model (the log above names why)")
        order = [client for client in clients if client in scored]
        return scores, Scores.of(self.data.domains, [self.data.clients[c].domain for c in order],
                               torch.cat([scored[c][0] for c in order]), [scored[c][1] for c in order])

    def save(self, round_index: int, record: RoundRecord) -> None:
        if record.personalised is not None:
            record.global_model = self.no_global_model
        super().save(round_index, record)

    def finish(self) -> None:
        """`fit`'s finish; where clients keep factors or the head of their own, no global model to export."""
        if self.no_global_model is None:
            super().finish()
            return
        self.outputs.finish("global model", metric_name(self.cfg.data.name))
        self.fabric.print(f"no {EXPORT_NAME}/ written: there is no global model under Flower")


def kept_keys(state: GlobalState, rule: ClientRule) -> set[str]:
    """The keys of `state.tensors()` (at one rank) that clients of `rule` keep of their own."""
    keys = {pair_key("lora", name, factor) for name in state.lora for factor in rule.keeps}
    return keys | (set(pack("extra", state.extra)) if rule.keeps_extra else set())


def partition_nodes(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """client (partition) id -> node id, asked of every node once all `num_clients` have connected."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise UserError(f"only {len(nodes)} of {num_clients} nodes connected within {timeout:.0f} s: start one "
                            f"SuperNode per client (partition-id 0..{num_clients - 1})")
        time.sleep(0.5)
    queries = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            continue
        partition = int(reply.content["metrics"]["partition-id"])
        if partition in node_of:
            raise UserError(f"two nodes have partition-id {partition}: give each SuperNode its own id "
                            f"(0..{num_clients - 1})")
        node_of[partition] = reply.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - set(node_of))
    if missing:
        raise UserError(f"no node answered with partition-id {', '.join(map(str, missing))} within {timeout:.0f} s "
                        f"(the ids given: {sorted(node_of)}): start one SuperNode per client, ids 0..{num_clients - 1}")
    return node_of


def run_server(cfg: FitConfig, grid: Grid, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Every round of `cfg` over the grid's nodes; writes out_dir as `fit` does and returns results.json."""
    with own_run_folder(cfg.out_dir):
        return FlowerRoundLoop(cfg, grid, timeout).run()


def make_server_app(config_of: Callable[[Context], FitConfig], errors: list[str] | None = None) -> ServerApp:
    """The ServerApp; a user error (bad config, failed round) is appended to `errors` when given, else raised."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            run_server(config_of(context), grid, float(context.run_config.get("timeout", DEFAULT_TIMEOUT)))
        except UserError as err:
            if errors is None:
                raise
            errors.append(str(err))

    return app


# ---- messages ---------------------------------------------------------------------------------------------------

def to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()})


def _dtype(tensor: torch.Tensor) -> str:
    """A tensor's dtype as a Flower Array names it ("float32")."""
    return str(tensor.dtype).removeprefix("torch.")


def result_of(client: int, reply: Message, held: dict[str, torch.Tensor]) -> ClientResult:
    """The ClientResult a node's train reply carries, the `held` tensors in place of those it leaves out."""
    tensors, metrics = {**held, **reply.content["arrays"].to_torch_state_dict()}, reply.content["metrics"]
    update = ClientUpdate(weight=int(metrics["num-examples"]), lora=unpack_pairs(tensors, "lora"),
                          extra=unpack(tensors, "extra"))
    return ClientResult(client=client, update=update, train_loss=float(metrics["train-loss"]),
                        steps=int(metrics["steps"]), skipped_images=int(metrics["skipped-images"]))


def gradient_shares(reply: Message | None, template: dict[str, tuple[tuple[int, ...], str]], count: int,
                    timeout: float) -> tuple[dict[str, torch.Tensor], str | None]:
    """(layer -> gradient, None) of a node's reply to the gradient request; ({}, what is wrong with it) if it is
    missing, an error, or not one finite float64 gradient per adapted layer of the frozen weight's shape with the
    client's example count `count`."""
    if reply is None:
        return {}, f"no reply within {timeout:.0f} s"
    if reply.has_error():
        return {}, " ".join(reply.error.reason.split())[:200]
    content = reply.content
    problem = screen_reply(content, template, "num-examples", count)
    if problem is None and (GRADIENT not in content.array_records or "metrics" not in content.metric_records):
        problem = f"its records are {sorted(content)}, not '{GRADIENT}' and 'metrics'"
    elif problem is None and content["metrics"]["num-examples"] != count:
        problem = f"example count {content['metrics']['num-examples']} is not the client's {count}"
    if problem is not None:
        return {}, f"malformed reply: {problem}"
    shares = content[GRADIENT].to_torch_state_dict()
    unfit = next((name for name, share in shares.items() if not torch.isfinite(share).all()), None)
    if unfit is not None:
        return {}, f"malformed reply: the gradient of {unfit} is not finite"
    return shares, None


def pending_merges(tensors: dict[str, torch.Tensor], applied: int) -> list[Pairs]:
    """The merges keyed `merge/<index>/<layer>/<A|B>` that a node with `applied` merges has not applied, in order;
    a gap is an error (the node's frozen weights would drift from the server's)."""
    indices = [index for index in merge_indices(tensors) if index >= applied]
    if indices and indices != list(range(applied, applied + len(indices))):
        raise ValueError(f"merges {indices} do not continue from the {applied} this node has applied")
    return [unpack_pairs(tensors, merge_kind(index)) for index in indices]


# ---- the engines ------------------------------------------------------------------------------------------------

_CONFIGS: dict[tuple[str, str], FitConfig] = {}


def run_config_to_fit_config(context: Context) -> FitConfig:
    """A deployed run's FitConfig: its run config's `config` (a path or a shipped config's name; "" for none) and
    `args` (more flags, as `lorafair fit` takes them), the same on the server and on every node."""
    key = (str(context.run_config.get("config", "")), str(context.run_config.get("args", "")))
    if key not in _CONFIGS:
        _CONFIGS[key] = parse_fit_config([*(["--config", key[0]] if key[0] else []), *shlex.split(key[1])])
    return _CONFIGS[key]


server_app = make_server_app(run_config_to_fit_config)
client_app = make_client_app(run_config_to_fit_config)
"""The deployment engine's apps (`flower-app/pyproject.toml` names them)."""

SIMULATION_BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                      "init_args": {"num_cpus": 1, "include_dashboard": False}}
"""One worker that trains the clients one after another, as one `fit` process does: the smallest Ray setup."""


LOCAL_RAY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch between a local-only instance (0: every Ray process listens on 127.0.0.1 alone) and one that other
machines can join (1, Ray's default on Linux: its GCS server, raylet and workers listen on every interface, and
whoever reaches them runs code as this user)."""


def keep_ray_local() -> None:
    """Make the simulation's Ray instance listen on the loopback interface only, unless the environment already
    sets LOCAL_RAY (set it to 1 to expose Ray deliberately). `ray.init(_node_ip_address="127.0.0.1")` does not
    do this: Ray replaces a loopback address by the machine's outward one."""
    os.environ.setdefault(LOCAL_RAY, "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray read the variable when it was imported
        constants.ENABLE_RAY_CLUSTER = constants.env_bool(LOCAL_RAY, True)


def simulate(cfg: FitConfig) -> dict[str, Any]:
    """`lorafair flower`: the job on Flower's simulation engine, one SuperNode per client; returns results.json.
    Ray listens on 127.0.0.1 only (keep_ray_local)."""
    keep_ray_local()
    from flwr.simulation import run_simulation

    data = build_federated_data(cfg.data, cfg.federation, cfg.seed, model_data_config(cfg.model, cfg.data.image_size))
    errors: list[str] = []
    run_simulation(make_server_app(lambda _: cfg, errors), make_client_app(lambda _: cfg),
                   num_supernodes=len(data.clients), backend_config=SIMULATION_BACKEND)
    if errors:
        raise UserError(errors[0])
    path = results_path(Path(cfg.out_dir))
    results = json.loads(path.read_text()) if path.exists() else {}
    if "final" not in results:
        raise UserError(f"the Flower run ended before its last round ({path} has no final result); its log above "
                        "names the failure")
    return results
