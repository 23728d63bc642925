"""The job of `lorafair fit` as a Flower ClientApp and ServerApp, from the same config.

The client role is `FederatedTrainer.train_client` (the same LightningModule, local loop and seeds derived from
(seed, round, client)) on the one client its node's `partition-id` names; the server role is `LoraStrategy` (the
same bad-update policy and aggregator) plus the trainer's evaluation, results.json, TensorBoard and checkpoints.
The server samples the clients of a round exactly as `fit` does, so both engines train the same clients with the
same seeds and reach the same accuracies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from lorafair import comm, faults
from lorafair.config import FitConfig
from lorafair.data import build_federated_data, model_data_config
from lorafair.errors import UserError
from lorafair.federation import sample_clients
from lorafair.flower.records import arrays_to_state, merges_to_apply, state_to_arrays
from lorafair.flower.strategy import MERGING_METHODS, LoraStrategy
from lorafair.results import mean
from lorafair.trainer import META, FederatedTrainer, aggregator_options, launch_fabric

MERGES, BASE, APPLIED = "lorafair.merges", "lorafair.base", "lorafair.applied"
_CLIENT_TRAINERS: dict[str, tuple[FederatedTrainer, dict]] = {}
"""One trainer per process and config (a worker may host several nodes in turn), with its pristine frozen weights."""


# ---- the client role ------------------------------------------------------------------------------------------

def client_trainer(cfg: FitConfig) -> tuple[FederatedTrainer, dict]:
    key = repr(cfg)
    if key not in _CLIENT_TRAINERS:
        trainer = FederatedTrainer(cfg, launch_fabric(cfg))
        _CLIENT_TRAINERS[key] = (trainer, trainer.model.base_state())
    return _CLIENT_TRAINERS[key]


def catch_up(trainer: FederatedTrainer, pristine: dict, msg: Message, context: Context) -> None:
    """Put this node's frozen weights in the model, after the merges it has not applied yet (kept in the node's
    state between rounds, so a node that sat out rounds ends up with exactly the server's weights)."""
    state = context.state
    applied = int(state[APPLIED]["count"]) if APPLIED in state else 0
    trainer.model.load_base_state(state[BASE].to_torch_state_dict() if BASE in state else pristine)
    pending = merges_to_apply(msg.content.get(MERGES), applied)
    for merge in pending:
        trainer.model.merge(merge)
    state[BASE] = ArrayRecord(torch_state_dict=trainer.model.base_state())
    state[APPLIED] = ConfigRecord({"count": applied + len(pending)})


def train(cfg: FitConfig, msg: Message, context: Context) -> Message:
    """Train this node's client from the global state in `msg` and reply with its factors and stats."""
    trainer, pristine = client_trainer(cfg)
    client = trainer.data.clients[int(context.node_config["partition-id"])]
    if cfg.server.method in MERGING_METHODS:
        catch_up(trainer, pristine, msg, context)
    arrays = msg.content["arrays"]
    trainer.global_lora, trainer.global_extra = arrays_to_state(arrays)
    round_index = int(msg.content["config"]["server-round"])
    faults.maybe_raise_in_client(round_index, client.id)
    payload, meta = trainer.train_client(client, round_index)
    flat = comm.unflatten(payload, trainer.payload_shapes)
    lora = {name: (flat[f"{name}.A"], flat[f"{name}.B"]) for name in trainer.global_lora}
    extra = {name: flat[name] for name in trainer.global_extra}
    stats = dict(zip(META, meta, strict=True))
    metrics = MetricRecord({"num-examples": int(stats["num_samples"]), "partition-id": client.id,
                            "train-loss": float(stats["train_loss"]), "steps": int(stats["steps"]),
                            "skipped-images": int(stats["skipped_images"])})
    return Message(RecordDict({"arrays": state_to_arrays(lora, extra, list(arrays.keys())), "metrics": metrics}),
                   reply_to=msg)


def make_client_app(cfg: FitConfig) -> ClientApp:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(cfg, msg, context)

    @app.query()
    def _partition(msg: Message, context: Context) -> Message:
        partition = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
        return Message(RecordDict({"metrics": partition}), reply_to=msg)

    return app


# ---- the server role ------------------------------------------------------------------------------------------

class NodeSubset:
    """A view of the grid that offers only the nodes `fit`'s sampling chose for this round."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def partition_nodes(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """client (partition) id -> node id, asked of every node once all `num_clients` have connected."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise UserError(f"only {len(nodes)} of {num_clients} nodes connected within {timeout:.0f} s: start one "
                            f"SuperNode per client (partition-id 0..{num_clients - 1})")
        time.sleep(0.5)
    queries = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    replies = grid.send_and_receive(queries, timeout=timeout)
    return {int(reply.content["metrics"]["partition-id"]): reply.metadata.src_node_id for reply in replies
            if not reply.has_error()}


def run_server(cfg: FitConfig, grid: Grid, timeout: float = 3600.0) -> dict[str, Any]:
    """Every round of `cfg` over the grid's nodes; writes out_dir as `fit` does and returns results.json."""
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    first = trainer.start_or_resume()
    if first > 1 and trainer.merged:
        raise UserError(f"resume: {cfg.server.method} merges into the frozen weights, and the nodes of a new Flower "
                        "run start from the pretrained ones; resume it with `lorafair fit` or start a new run")
    node_of = partition_nodes(grid, len(trainer.data.clients), timeout)
    options = {name: value for name, value in aggregator_options(cfg).items() if name != "seed"}
    strategy = LoraStrategy(cfg.server.method, options, seed=cfg.seed, on_bad_update=cfg.federation.on_bad_update,
                            fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    arrays = state_to_arrays(trainer.global_lora, trainer.global_extra)
    for round_index in range(first, cfg.federation.rounds + 1):
        arrays = run_round(trainer, strategy, grid, arrays, round_index, node_of, timeout)
    return trainer.finish()


def run_round(trainer: FederatedTrainer, strategy: LoraStrategy, grid: Grid, arrays: ArrayRecord, round_index: int,
              node_of: dict[int, int], timeout: float) -> ArrayRecord:
    """One round: the clients `fit` samples train on their nodes, the strategy aggregates, the server evaluates
    and saves. Returns the next global arrays."""
    cfg, clock = trainer.cfg, time.perf_counter
    start = clock()
    sampled = sample_clients([c.id for c in trainer.data.clients], trainer.per_round, cfg.seed, round_index)
    nodes = NodeSubset([node_of[client] for client in sampled if client in node_of])
    replies = grid.send_and_receive(strategy.configure_train(round_index, arrays, ConfigRecord(), nodes),
                                    timeout=timeout)
    trained = clock()
    merges_before = len(strategy.merges)
    new_arrays, _ = strategy.aggregate_train(round_index, replies)
    if new_arrays is not None:
        if len(strategy.merges) > merges_before:
            trainer.model.merge(strategy.merges[-1])
            trainer.merged = True
        trainer.global_lora, trainer.global_extra = arrays_to_state(new_arrays)
    aggregated = clock()
    evaluate = round_index % cfg.federation.eval_every == 0 or round_index == cfg.federation.rounds
    accuracy = trainer.evaluate(round_index) if evaluate else None
    evaluated = clock()
    record = {"round": round_index, "bytes_up": 0, "bytes_down": 0, **strategy.round_records[round_index],
              "clients": sampled, "skipped": new_arrays is None}
    seconds = {"train": trained - start, "aggregate": aggregated - trained, "eval": evaluated - aggregated,
               "round": evaluated - start}
    record.update(seconds=seconds, overhead=seconds["aggregate"] / seconds["round"])
    if accuracy is not None:
        record.update(accuracy=accuracy, mean_accuracy=mean(list(accuracy.values())))
    trainer.save(round_index, record)
    return new_arrays if new_arrays is not None else arrays


def make_server_app(cfg: FitConfig, errors: list[str] | None = None) -> ServerApp:
    """The ServerApp; a user error (bad config, failed round) is appended to `errors` when given, else raised."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            run_server(cfg, grid)
        except UserError as err:
            if errors is None:
                raise
            errors.append(str(err))

    return app


# ---- the simulation engine ------------------------------------------------------------------------------------

SIMULATION_BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                      "init_args": {"num_cpus": 1, "include_dashboard": False}}
"""One worker that trains the clients one after another, as one `fit` process does: the smallest Ray setup."""


def simulate(cfg: FitConfig) -> dict[str, Any]:
    """`lorafair flower`: the job on Flower's simulation engine, one SuperNode per client; returns results.json."""
    from flwr.simulation import run_simulation

    data = build_federated_data(cfg.data, cfg.federation, cfg.seed, model_data_config(cfg.model, cfg.data.image_size))
    errors: list[str] = []
    run_simulation(make_server_app(cfg, errors), make_client_app(cfg), num_supernodes=len(data.clients),
                   backend_config=SIMULATION_BACKEND)
    if errors:
        raise UserError(errors[0])
    results_file = Path(cfg.out_dir) / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if "final" not in results:
        raise UserError(f"the Flower run ended before its last round ({results_file} has no final result); "
                        "its log above names the failure")
    return results
