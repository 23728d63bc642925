"""The job of `lorafair fit` as a Flower ClientApp and ServerApp: Flower is one more transport of the round loop.

The ClientApp is the client role (`LocalTrainer.train`: the same LightningModule, local loop and seeds derived from
(seed, round, client)) on the one client its node's `partition-id` names, holding only that client's data. The
ServerApp is `fit`'s round loop (`FederatedTrainer`) with its local training replaced by messages to the
nodes: the same sampling, server role (bad-update policy and aggregation), evaluation, results.json, TensorBoard,
checkpoints and resume. Messages carry the named tensors of `lorafair.keys` in ArrayRecords. A node whose
reply is an error (it failed mid-round) is left out of the round and named in results.json.

FLoRA and FedEx-LoRA merge into the frozen weights. The server keeps the run's merges; a node keeps its frozen
weights and the count of merges it applied in its node state, and each message carries the merges its node has not
confirmed yet, so a node that sat out rounds catches up exactly. A resumed run sends each node the checkpoint's
frozen weights once. A node trains the factors its method's client rule trains (FFA-LoRA: B); methods whose
clients keep factors of their own, or train other factors from round to round, are refused
(`lorafair.flower.strategy.flower_refusal`).

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
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from lorafair.aggregation import ClientUpdate, method_class
from lorafair.config import FitConfig
from lorafair.config_parse import parse_fit_config
from lorafair.data import Client, build_client_data, build_federated_data, model_data_config
from lorafair.errors import UserError
from lorafair.export import export_final
from lorafair.federated import faults
from lorafair.federated.client import LocalTrainer
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.federated.run_folder import own_run_folder, results_path
from lorafair.federated.server import aggregator_options, client_rule
from lorafair.federated.state import ClientResult, GlobalState, ServerAnswer
from lorafair.flower.strategy import flower_refusal, screen_reply
from lorafair.keys import Pairs, merge_indices, merge_kind, pack, pack_pairs, pair_key, unpack, unpack_pairs
from lorafair.models.build import build_model

MERGES, BASE, APPLIED = "lorafair.merges", "lorafair.base", "lorafair.applied"
"""Message records of the merges a node has not applied and of the resumed frozen weights; the node state record of
how many merges it applied."""
DEFAULT_TIMEOUT = 600.0
"""Seconds the server waits for the nodes to connect and for a round's replies."""


# ---- the client role ------------------------------------------------------------------------------------------

_TRAINERS: dict[str, tuple[LocalTrainer, dict[str, torch.Tensor]]] = {}
"""One model per process and config (a simulation worker hosts every node in turn), with its pristine frozen
weights; a node's own frozen weights live in its node state."""
_CLIENTS: dict[tuple[str, int], Client] = {}


def node_trainer(cfg: FitConfig, partition: int) -> tuple[LocalTrainer, dict[str, torch.Tensor], Client]:
    """This process's client role for `cfg`, its pristine frozen weights, and the data of client `partition` only."""
    key = repr(cfg)
    if (key, partition) not in _CLIENTS:
        data_config = model_data_config(cfg.model, cfg.data.image_size)
        _CLIENTS[key, partition], classes = build_client_data(cfg.data, cfg.federation, cfg.seed, data_config,
                                                              partition)
        if key not in _TRAINERS:
            fabric = launch_fabric(cfg, tensorboard=False)
            model = build_model(cfg, len(classes), fabric.device)
            _TRAINERS[key] = (LocalTrainer(model, fabric, cfg.client, cfg.data, cfg.seed, show_progress=False),
                              model.base_state())
    return (*_TRAINERS[key], _CLIENTS[key, partition])


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
    """Train this node's client from the global state in `msg`; reply with its update and statistics."""
    trainer, pristine, client = node_trainer(cfg, int(context.node_config["partition-id"]))
    if method_class(cfg.server.method).merges:
        catch_up(trainer, pristine, msg, context)
    tensors = msg.content["arrays"].to_torch_state_dict()
    start = GlobalState.from_tensors(tensors)
    round_index = int(msg.content["config"]["server-round"])
    faults.maybe_raise_in_client(round_index, client.id)
    factors = client_rule(cfg.server, cfg.seed, round_index).trains
    result = trainer.train(client, start, round_index, int(msg.content["config"]["lora-rank"]), factors=factors)
    update = {**pack_pairs("lora", result.update.lora), **pack("extra", result.update.extra)}
    metrics = MetricRecord({"num-examples": int(result.update.weight), "train-loss": float(result.train_loss),
                            "steps": result.steps, "skipped-images": result.skipped_images})
    return Message(RecordDict({"arrays": to_arrays(update), "metrics": metrics}), reply_to=msg)


def make_client_app(config_of: Callable[[Context], FitConfig]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(config_of(context), msg, context)

    @app.query()
    def _partition(msg: Message, context: Context) -> Message:
        partition = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
        return Message(RecordDict({"metrics": partition}), reply_to=msg)

    return app


# ---- the server role ------------------------------------------------------------------------------------------

class FlowerRoundLoop(FederatedTrainer):
    """`fit`'s round loop in one process, whose clients train on the grid's nodes."""
    def __init__(self, cfg: FitConfig, grid: Grid, timeout: float) -> None:
        if cfg.federation.setting != "federated":
            raise UserError(f"federation.setting {cfg.federation.setting} is a bound for `lorafair fit` and "
                            f"`lorafair compare`; Flower runs federated methods only")
        refuse_unsupported(cfg)
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

    def start_or_resume(self) -> int:
        first = super().start_or_resume()
        if self.merged:
            self.resumed_base = self.model.base_state()
        self.node_of = partition_nodes(self.grid, len(self.data.clients), self.timeout)
        return first

    def train_clients(self, round_index: int, sampled: list[int],
                      steps: int | None = None) -> tuple[list[ClientResult], dict[str, int], float]:
        """Send the round to the sampled clients' nodes and collect their results; client id -> node id. `steps`
        is always None here: it is set only for the centralized bound, which Flower does not run."""
        replies = self.grid.send_and_receive([self.train_message(round_index, client) for client in sampled],
                                             timeout=self.timeout)
        trained = time.perf_counter()
        client_of = {node: client for client, node in self.node_of.items()}
        results, self.failed = [], {str(client): f"no reply within {self.timeout:.0f} s" for client in sampled}
        self.malformed = {}
        for reply in replies:
            client = client_of[reply.metadata.src_node_id]
            if reply.has_error():
                self.failed[str(client)] = reply.error.reason
                continue
            del self.failed[str(client)]
            self.merges_applied[client] = len(self.merges)
            problem = screen_reply(reply.content, self.reply_template(client), "num-examples",
                                   self.participants[client].num_samples)
            result = None
            try:
                result = result_of(client, reply) if problem is None else None
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                problem = f"unreadable: {' '.join(str(err).split())[:200]}"
            if result is None:
                self.malformed[str(client)] = f"malformed reply from node {reply.metadata.src_node_id}: {problem}"
                continue
            results.append(result)
        results.sort(key=lambda result: result.client)
        return results, {str(result.client): self.node_of[result.client] for result in results}, trained

    def train_message(self, round_index: int, client: int) -> Message:
        content = RecordDict({"arrays": to_arrays(self.global_state.tensors()),
                              "config": ConfigRecord({"server-round": round_index,
                                                      "lora-rank": self.client_ranks[client]})})
        if method_class(self.cfg.server.method).merges:
            if client not in self.merges_applied and self.resumed_base:
                content[BASE] = to_arrays(self.resumed_base)
            start = self.merges_applied.get(client, 0)
            content[MERGES] = to_arrays({key: tensor for index in range(start, len(self.merges))
                                         for key, tensor in pack_pairs(merge_kind(index), self.merges[index]).items()})
        return Message(content, message_type=MessageType.TRAIN, dst_node_id=self.node_of[client])

    def reply_template(self, client: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """key -> (shape, dtype) of the update `client` must send: the global LoRA pairs at its rank and the extra
        tensors."""
        rank, template = self.client_ranks[client], {}
        for name, (lora_a, lora_b) in self.global_state.lora.items():
            template[pair_key("lora", name, "A")] = ((rank, lora_a.shape[1]), _dtype(lora_a))
            template[pair_key("lora", name, "B")] = ((lora_b.shape[0], rank), _dtype(lora_b))
        template.update({key: (tuple(tensor.shape), _dtype(tensor))
                         for key, tensor in pack("extra", self.global_state.extra).items()})
        return template

    def aggregate(self, round_index: int, results: list[ClientResult], sampled: list[int],
                  unreadable: dict[str, str] | None = None) -> ServerAnswer:
        """The round loop's answer, with the malformed replies as bad updates under its policy and the failed nodes
        in the record."""
        answer = super().aggregate(round_index, results, sampled, {**self.malformed, **(unreadable or {})})
        answer.record.failed_clients = dict(sorted(self.failed.items(), key=lambda item: int(item[0])))
        return answer

    def apply(self, round_index: int, answer: ServerAnswer) -> None:
        super().apply(round_index, answer)
        if answer.merge and not answer.record.skipped:
            self.merges.append(answer.merge)


def refuse_unsupported(cfg: FitConfig) -> None:
    """One UserError where the config's method cannot run under Flower yet (`flower_refusal`)."""
    refusal = flower_refusal(cfg.server.method, aggregator_options(cfg.server, cfg.seed))
    if refusal is not None:
        raise UserError(refusal)


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


def result_of(client: int, reply: Message) -> ClientResult:
    """The ClientResult a node's train reply carries."""
    tensors, metrics = reply.content["arrays"].to_torch_state_dict(), reply.content["metrics"]
    update = ClientUpdate(weight=int(metrics["num-examples"]), lora=unpack_pairs(tensors, "lora"),
                          extra=unpack(tensors, "extra"))
    return ClientResult(client=client, update=update, train_loss=float(metrics["train-loss"]),
                        steps=int(metrics["steps"]), skipped_images=int(metrics["skipped-images"]))


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
    refuse_unsupported(cfg)
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
