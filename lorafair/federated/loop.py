"""`lorafair fit`: the round loop, composing the client, the server and the transport on Lightning Fabric.

One round (`FederatedTrainer.run_round`):
    sample clients -> assign them to ranks -> each rank trains its clients (client role) -> the transport gathers
    the results on rank 0 -> the server aggregates -> the transport delivers its answer to every rank -> every rank
    applies it (merging into its frozen weights for FLoRA / FedEx-LoRA) -> sharded evaluation -> results.json,
    TensorBoard and a checkpoint on rank 0.

Clients keep no state between rounds and everything random is seeded by (seed, round, client), so the results do
not depend on the number of ranks, on which rank hosts a client, or on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from tqdm import tqdm

from lorafair.aggregation import ClientUpdate, ranks
from lorafair.config import FitConfig
from lorafair.data import FederatedData, build_federated_data, model_data_config
from lorafair.errors import UserError
from lorafair.federated import faults
from lorafair.federated.checkpoints import (
    check_fits,
    checkpoint_state,
    find_checkpoint,
    partition_fingerprint,
    resume_state,
    save_checkpoint,
)
from lorafair.federated.client import LocalTrainer
from lorafair.federated.sampling import assign_to_ranks, derive_seed, sample_clients
from lorafair.federated.server import Server
from lorafair.federated.state import ClientResult, GlobalState, ResumeState, RoundRecord, ServerAnswer, pack
from lorafair.federated.transport import TorchDistributedTransport
from lorafair.model import LoraClassifier
from lorafair.reporting.run_folder import (
    CLASSES_NAME,
    CONFIG_NAME,
    TENSORBOARD_NAME,
    accuracy_table,
    checkpoint_dir,
    config_to_dict,
    flatten_config,
    results_path,
    tensorboard_scalars,
    trajectory_identity,
    write_json,
    write_yaml,
)


def fit(cfg: FitConfig) -> dict[str, Any]:
    """Run the federated job of `cfg` and return the content of its results.json (on every rank)."""
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    results = trainer.run()
    trainer.transport.close()
    return results


def launch_fabric(cfg: FitConfig) -> Fabric:
    """One process per device under torchrun (gloo on CPU, NCCL on GPU), else a single process.

    bf16-mixed on CUDA and 32-true elsewhere unless `precision` says otherwise. TensorBoard goes to
    out_dir/tensorboard (Fabric writes it from rank 0 only).
    """
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    under_torchrun = "LOCAL_WORLD_SIZE" in os.environ
    on_cuda = cfg.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    if under_torchrun and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        join_restarted_process_group("nccl" if on_cuda else "gloo")
    precision = cfg.precision or ("bf16-mixed" if on_cuda else "32-true")
    logger = TensorBoardLogger(root_dir=cfg.out_dir, name=TENSORBOARD_NAME, version="", default_hp_metric=False)
    fabric = Fabric(accelerator=cfg.accelerator, strategy="ddp" if under_torchrun else "auto",
                    devices=int(os.environ["LOCAL_WORLD_SIZE"]) if under_torchrun else 1, num_nodes=cfg.num_nodes,
                    precision=precision, loggers=logger)
    fabric.launch()
    return fabric


def join_restarted_process_group(backend: str) -> None:
    """Join the process group of a torchrun restart under a key prefix of its own (Fabric then reuses the group).

    torchrun keeps one key-value store for all attempts of a job; without the prefix, the ranks of a restarted
    attempt can read the connection addresses the killed attempt left there and fail to connect.
    """
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    dist.init_process_group(backend, store=dist.PrefixStore(f"lorafair/attempt_{attempt}", agent_store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def build_model(cfg: FitConfig, data: FederatedData, device: torch.device) -> LoraClassifier:
    """The client model of this process, with identical random parts (head, LoRA, a backbone without weights) on
    every rank."""
    torch.manual_seed(derive_seed("model", cfg.seed))
    model = LoraClassifier(cfg.model, cfg.lora, data.num_classes, cfg.client).to(device)
    if cfg.server.method == "ffa_lora":
        model.freeze_lora_A(True)
    return model


class FederatedTrainer:
    """The round loop: holds this rank's roles, the global state every client starts a round from, and the
    results."""

    def __init__(self, cfg: FitConfig, fabric: Fabric) -> None:
        self.cfg, self.fabric = cfg, fabric
        self.out_dir = Path(cfg.out_dir)
        self.server_seconds = 0.0
        self.data = build_federated_data(cfg.data, cfg.federation, cfg.seed,
                                         model_data_config(cfg.model, cfg.data.image_size))
        clients = self.data.clients
        self.per_round = cfg.federation.clients_per_round or len(clients)
        if self.per_round > len(clients):
            raise UserError(f"federation.clients_per_round: {self.per_round} is more than the {len(clients)} clients "
                            f"of this partition; lower it (or null for all)")
        self.model = build_model(cfg, self.data, fabric.device)
        self.client_ranks = cfg.lora.rank_of([(c.id, c.domain) for c in clients], self.data.domains)
        self.lower_ranks = tuple(sorted(set(self.client_ranks.values()) - {cfg.lora.r}))
        self.global_state = self.state_of(self.fresh_lora("lora_init", cfg.seed), self.model.get_extra())
        self.merged = False
        shapes = {key: t.shape for key, t in self.global_state.tensors().items() if not key.startswith("lora_r")}
        self.transport = TorchDistributedTransport(fabric.device, shapes)
        self.rank, self.world = self.transport.rank, self.transport.world
        self.client = LocalTrainer(self.model, fabric, cfg.client, cfg.data, cfg.seed, show_progress=self.rank == 0)
        self.server = Server(cfg.server, cfg.federation.on_bad_update, cfg.seed, log=fabric.print)
        self.identity = trajectory_identity(flatten_config(config_to_dict(cfg)), partition_fingerprint(
            (c.id, c.domain, c.num_samples, c.class_counts) for c in clients))
        self.results: dict[str, Any] = {
            "method": cfg.server.method, "seed": cfg.seed, "config": config_to_dict(cfg), "domains": self.data.domains,
            "clients": [{"id": c.id, "domain": c.domain, "num_samples": c.num_samples} for c in clients],
            "rounds": [], "bad_updates_total": 0,
        }

    def run(self) -> dict[str, Any]:
        rounds = self.cfg.federation.rounds
        first = self.start_or_resume()
        progress = tqdm(range(first, rounds + 1), desc=f"{self.cfg.server.method} rounds", initial=first - 1,
                        total=rounds, disable=self.rank != 0, file=sys.stdout, dynamic_ncols=True)
        for round_index in progress:
            record = self.run_round(round_index)
            if record is not None and record.accuracy is not None:
                progress.set_postfix(mean_acc=f"{100 * record.to_dict()['mean_accuracy']:.2f}%")
        if self.rank == 0:
            self.finish()
        return self.fabric.broadcast(self.results if self.rank == 0 else None, src=0)

    def run_round(self, round_index: int) -> RoundRecord | None:
        """One round on every rank; returns the round's record on rank 0 (None elsewhere)."""
        clock = time.perf_counter
        start = clock()
        sampled = sample_clients([c.id for c in self.data.clients], self.per_round, self.cfg.seed, round_index)
        hosted = assign_to_ranks(sampled, {c.id: c.num_samples for c in self.data.clients}, self.world)
        results = [self.client.train(self.data.clients[c], self.global_state, round_index, self.client_ranks[c])
                   for c in hosted[self.rank]]
        self.transport.wait_for_all()
        trained = clock()
        faults.maybe_fail(round_index, "gather")
        gathered_results = self.transport.gather(results, hosted)
        gathered = clock()
        answer = self.transport.from_server(lambda: self.aggregate(round_index, gathered_results), ServerAnswer)
        self.apply(round_index, answer)
        applied = clock()
        evaluate = round_index % self.cfg.federation.eval_every == 0 or round_index == self.cfg.federation.rounds
        accuracy = self.evaluate(round_index) if evaluate else None
        evaluated = clock()
        record = None
        if self.rank == 0:
            comm = (gathered - trained) + (applied - gathered - self.server_seconds)
            seconds = {"train": trained - start, "comm": comm, "aggregate": self.server_seconds,
                       "eval": evaluated - applied, "round": evaluated - start}
            ranks = {str(client): rank for rank, clients in enumerate(hosted) for client in clients}
            record = RoundRecord(round_index, sampled, ranks, answer.record, seconds, accuracy)
            self.save(round_index, record)
        self.transport.wait_for_all()  # the round is on disk before any rank starts the next
        return record

    def aggregate(self, round_index: int, results: list[ClientResult]) -> ServerAnswer:
        """Rank 0: the server's answer to the round, timed (server_seconds) apart from the transport."""
        start = time.perf_counter()
        faults.maybe_fail(round_index, "aggregate")
        like = ClientUpdate(weight=1.0, lora=self.global_state.lora, extra=self.global_state.extra)
        answer = self.server.aggregate(round_index, results, like, self.lower_ranks)
        self.server_seconds = time.perf_counter() - start
        return answer

    def apply(self, round_index: int, answer: ServerAnswer) -> None:
        """Every rank: take the server's answer as the next starting point (FLoRA: merge, then fresh LoRA)."""
        if answer.record.skipped:
            return
        if answer.merge:
            self.model.merge(answer.merge)
            self.merged = True
        if answer.lora is None:
            self.global_state = self.state_of(self.fresh_lora("lora_reinit", self.cfg.seed, round_index), answer.extra)
        else:
            self.global_state = GlobalState(answer.lora, answer.extra, answer.by_rank)

    def state_of(self, lora: dict, extra: dict) -> GlobalState:
        """A global state whose lower-rank clients start from the leading components of `lora` (a fresh LoRA)."""
        return GlobalState(lora, extra, {rank: {name: ranks.to_client(pair, rank) for name, pair in lora.items()}
                                         for rank in self.lower_ranks})

    def fresh_lora(self, *seed_parts: int | str) -> dict:
        """A fresh LoRA start (A random, B zero) from a generator every rank seeds alike."""
        self.model.init_lora(torch.Generator().manual_seed(derive_seed(*seed_parts)))
        return self.model.get_lora()

    def evaluate(self, round_index: int) -> dict[str, float]:
        """Top-1 of the global model per domain; each rank takes a contiguous shard of every test set."""
        faults.maybe_fail(round_index, "eval")
        counts = self.client.count_correct(self.global_state, [self.data.test[d] for d in self.data.domains],
                                           (self.rank, self.world))
        self.transport.sum_over_ranks(counts)
        return {domain: (counts[i, 0] / counts[i, 1]).item() for i, domain in enumerate(self.data.domains)}

    # ---- outputs and checkpoints (rank 0) ------------------------------------------------------------------------

    def save(self, round_index: int, record: RoundRecord) -> None:
        """results.json, TensorBoard scalars, then the checkpoint of this round."""
        entry = record.to_dict()
        self.results["rounds"].append(entry)
        self.results["bad_updates_total"] += len(entry["bad_updates"])
        if round_index == self.cfg.federation.rounds:
            self.results["final"] = final_accuracy(self.results)
        write_json(results_path(self.out_dir), self.results)
        self.fabric.log_dict({**tensorboard_scalars(entry), "bad_updates_total": self.results["bad_updates_total"]},
                             step=round_index)
        base = self.model.base_state() if self.merged else None
        save_checkpoint(checkpoint_dir(self.out_dir), round_index,
                        checkpoint_state(round_index, self.identity, self.results, self.global_state, base),
                        before_rename=lambda: faults.maybe_fail(round_index, "checkpoint"))

    def finish(self) -> None:
        """The final results.json, the hparams entry of TensorBoard and the accuracy table."""
        self.results["final"] = final = final_accuracy(self.results)
        write_json(results_path(self.out_dir), self.results)
        self.fabric.logger.log_hyperparams(flatten_config(self.results["config"]),
                                           metrics={"hparams/mean_accuracy": final["mean_accuracy"]})
        self.fabric.logger.finalize("success")
        self.fabric.print(accuracy_table(final["accuracy"], final["mean_accuracy"],
                                         f"{self.cfg.server.method}: global model after round {final['round']}"))

    def start_or_resume(self) -> int:
        """Every rank: the first round to run. Rank 0 writes config.yaml and classes.json, reads the checkpoint
        to resume from (if any) and the transport sends its state to the other ranks (no shared disk needed)."""
        resumed = self.transport.from_server(self.read_resume_state, ResumeState)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_yaml(self.out_dir / CONFIG_NAME, config_to_dict(self.cfg))
            write_json(self.out_dir / CLASSES_NAME, self.data.classes)
        if resumed is None:
            return 1
        self.global_state = resumed.state
        if resumed.base:
            self.model.load_base_state(resumed.base)
            self.merged = True
        if self.rank == 0:
            self.results["rounds"] = resumed.records
            self.results["bad_updates_total"] = sum(len(r["bad_updates"]) for r in resumed.records)
            self.fabric.print(f"resuming after round {resumed.round} from {resumed.path}")
        return resumed.round + 1

    def read_resume_state(self) -> ResumeState | None:
        """Rank 0: None for a fresh start, else the checkpoint's state, checked against this run and model."""
        found = find_checkpoint(self.out_dir, self.cfg.resume, self.fabric.print)
        if found is None:
            return None
        resumed = resume_state(*found, self.identity, self.cfg.federation.rounds, self.cfg.resume_force,
                               self.fabric.print)
        expected = {**self.global_state.tensors(), **pack("base", self.model.base_state())}
        check_fits(resumed, {key: tensor.shape for key, tensor in expected.items()})
        return resumed


def final_accuracy(results: dict[str, Any]) -> dict[str, Any]:
    """The last evaluated round's accuracies: the run's result."""
    last = next(record for record in reversed(results["rounds"]) if "accuracy" in record)
    return {"round": last["round"], "accuracy": last["accuracy"], "mean_accuracy": last["mean_accuracy"]}
