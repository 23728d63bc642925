"""`lorafair fit`: the round loop, composing the client, the server and the transport on Lightning Fabric.

One round (`FederatedTrainer.run_round`):
    sample clients -> assign them to ranks -> each rank trains its clients (client role) and folds their updates
    into the method's accumulators (server role) -> the transport shares the clients' reports and sums the
    accumulators over the ranks -> rank 0 finishes the aggregation and the transport delivers its answer to every
    rank -> every rank applies it (merging into its frozen weights for FLoRA / FedEx-LoRA) -> sharded evaluation ->
    results.json, TensorBoard and a checkpoint on rank 0.
After the last round rank 0 prints the accuracy table and exports the global model to out_dir/final
(`lorafair.export`; not with export false).

Clients keep no state between rounds and everything random is seeded by (seed, round, client), so the results do
not depend on the number of ranks, on which rank hosts a client, or on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from lightning.fabric.strategies import DDPStrategy
from tqdm import tqdm

from lorafair.aggregation import ClientUpdate, RoundState, ranks
from lorafair.config import FitConfig, metric_name
from lorafair.data import FederatedData, build_federated_data, model_data_config
from lorafair.errors import UserError
from lorafair.federated import faults
from lorafair.federated.bounds import local_steps, union_client
from lorafair.federated.checkpoints import (
    check_fits,
    checkpoint_state,
    find_checkpoint,
    resume_state,
    save_checkpoint,
)
from lorafair.federated.client import ClientModel, LocalTrainer
from lorafair.federated.fingerprints import run_fingerprints
from lorafair.federated.launch import check_launch, die_with_parent
from lorafair.federated.sampling import assign_to_ranks, derive_seed, sample_clients
from lorafair.federated.server import ClientReport, Server
from lorafair.federated.state import (
    ClientResult,
    GlobalState,
    ResumeState,
    RoundRecord,
    Scores,
    ServerAnswer,
    ServerRecord,
    pack,
    pack_pairs,
)
from lorafair.federated.transport import PeerLost, TorchDistributedTransport
from lorafair.model import LoraClassifier
from lorafair.reporting.run_folder import (
    CLASSES_NAME,
    CONFIG_NAME,
    EXPORT_NAME,
    TENSORBOARD_NAME,
    accuracy_table,
    checkpoint_dir,
    config_to_dict,
    flatten_config,
    own_run_folder,
    results_path,
    score_scalars,
    tensorboard_scalars,
    trajectory_identity,
    write_json,
    write_yaml,
)


def fit(cfg: FitConfig) -> dict[str, Any]:
    """Run the federated job of `cfg` and return the content of its results.json (on every rank)."""
    with own_run_folder(cfg.out_dir, lead=int(os.environ.get("RANK", "0")) == 0):  # under torchrun, rank 0 owns it
        trainer = FederatedTrainer(cfg, launch_fabric(cfg))
        results = trainer.run()
        trainer.transport.close()
    return results


def launch_fabric(cfg: FitConfig, tensorboard: bool = True) -> Fabric:
    """One process per device under torchrun (gloo on CPU, NCCL on GPU), else a single process.

    bf16-mixed on CUDA and 32-true elsewhere unless `precision` says otherwise. TensorBoard goes to
    out_dir/tensorboard (Fabric writes it from rank 0 only); a process that only trains clients (a Flower node)
    passes tensorboard=False.
    The launch is checked against num_nodes first, and every collective times out after federation.timeout, so a
    missing or stuck rank is one line instead of a hang.
    """
    check_launch(cfg.num_nodes, os.environ, sys.argv[1:])
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    under_torchrun = "LOCAL_WORLD_SIZE" in os.environ
    timeout = timedelta(seconds=cfg.federation.timeout)
    if under_torchrun:
        die_with_parent()  # a killed torchrun agent takes its ranks with it
    on_cuda = cfg.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    if under_torchrun and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        join_restarted_process_group("nccl" if on_cuda else "gloo", timeout)
    precision = cfg.precision or ("bf16-mixed" if on_cuda else "32-true")
    logger = (TensorBoardLogger(root_dir=cfg.out_dir, name=TENSORBOARD_NAME, version="", default_hp_metric=False)
              if tensorboard else None)
    fabric = Fabric(accelerator=cfg.accelerator, strategy=DDPStrategy(timeout=timeout) if under_torchrun else "auto",
                    devices=int(os.environ["LOCAL_WORLD_SIZE"]) if under_torchrun else 1, num_nodes=cfg.num_nodes,
                    precision=precision, loggers=logger)
    fabric.launch()
    return fabric


def join_restarted_process_group(backend: str, timeout: timedelta) -> None:
    """Join the process group of a torchrun restart under a key prefix of its own (Fabric then reuses the group).

    torchrun keeps one key-value store for all attempts of a job; without the prefix, the ranks of a restarted
    attempt can read the connection addresses the killed attempt left there and fail to connect.
    """
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    dist.init_process_group(backend, store=dist.PrefixStore(f"lorafair/attempt_{attempt}", agent_store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


def build_data(cfg: FitConfig) -> FederatedData:
    """Clients and test sets: images rendered for the timm model, or text tokenized for the transformers one (whose
    modules, and `datasets`, are imported only then)."""
    if cfg.model.resolved_family(cfg.data.name) == "transformers":
        from lorafair.text.data import build_text_data, load_tokenizer

        return build_text_data(cfg, load_tokenizer(cfg.model))
    return build_federated_data(cfg.data, cfg.federation, cfg.seed, model_data_config(cfg.model, cfg.data.image_size))


def build_model(cfg: FitConfig, num_classes: int, device: torch.device) -> ClientModel:
    """The client model of this process (chosen by model.family), with identical random parts (head, LoRA, a
    backbone without weights) on every rank, and in `lorafair export` which rebuilds a run's global model from a
    checkpoint."""
    torch.manual_seed(derive_seed("model", cfg.seed))
    if cfg.model.resolved_family(cfg.data.name) == "transformers":
        from lorafair.text.model import TextLoraModel

        model = TextLoraModel(cfg, num_classes).to(device)
    else:
        model = LoraClassifier(cfg.model, cfg.lora, num_classes, cfg.client).to(device)
    if cfg.server.method == "ffa_lora":
        model.freeze_lora_A(True)
    return model


def state_shapes(model: LoraClassifier) -> dict[str, torch.Size]:
    """The shapes a checkpoint's tensors must have to fit `model`, in the packed key format."""
    tensors = {**pack_pairs("lora", model.get_lora()), **pack("extra", model.get_extra()),
               **pack("base", model.base_state())}
    return {key: tensor.shape for key, tensor in tensors.items()}


class FederatedTrainer:
    """The round loop: holds this rank's roles, the global state every client starts a round from, and the
    results."""
    def __init__(self, cfg: FitConfig, fabric: Fabric) -> None:
        method = cfg.server.method
        self.setting = cfg.federation.setting
        if self.setting != "federated":  # a bound takes its one update as it is: FedIT's average of one, or none
            method, cfg = self.setting, replace(cfg, server=replace(cfg.server, method="fedit"))
        self.cfg, self.fabric = cfg, fabric
        self.out_dir = Path(cfg.out_dir)
        self.server_seconds = 0.0
        self.data = build_data(cfg)
        clients = self.data.clients
        self.per_round = cfg.federation.clients_per_round or len(clients)
        if self.per_round > len(clients):
            raise UserError(f"federation.clients_per_round: {self.per_round} is more than the {len(clients)} clients "
                            f"of this partition; lower it (or null for all)")
        self.model = build_model(cfg, self.data.num_classes, fabric.device)
        self.client_ranks = cfg.lora.rank_of([(c.id, c.domain) for c in clients], self.data.domains)
        self.union = union_client(clients) if self.setting == "centralized" else None
        self.participants = {c.id: c for c in ([self.union] if self.union else clients)}
        """Who trains: the clients, or for the centralized bound the one client holding all their data."""
        if self.union is not None:
            self.client_ranks[self.union.id] = cfg.lora.r
        self.own_states: dict[int, GlobalState] = {}
        """The local bound: each client's own state after its last round (the global state until it trained)."""
        self.trained: dict[int, GlobalState] = {}
        self.lower_ranks = tuple(sorted(set(self.client_ranks.values()) - {cfg.lora.r}))
        self.global_state = self.state_of(self.fresh_lora("lora_init", cfg.seed), self.model.get_extra())
        self.merged = False
        self.transport = TorchDistributedTransport(fabric.device)
        self.rank, self.world = self.transport.rank, self.transport.world
        self.client = LocalTrainer(self.model, fabric, cfg.client, cfg.data, cfg.seed, show_progress=self.rank == 0)
        self.server = Server(cfg.server, cfg.federation.on_bad_update, cfg.seed, log=fabric.print)
        self.identity = trajectory_identity(flatten_config(config_to_dict(cfg)), run_fingerprints(self.data, cfg.model))
        self.results: dict[str, Any] = {
            "method": method, "seed": cfg.seed, "config": config_to_dict(cfg), "domains": self.data.domains,
            "clients": [{"id": c.id, "domain": c.domain, "num_samples": c.num_samples}
                        for c in self.participants.values()],
            "rounds": [], "bad_updates_total": 0,
        }

    def run(self) -> dict[str, Any]:
        rounds = self.cfg.federation.rounds
        first = self.start_or_resume()
        if first == 1:
            self.score_start()
        progress = tqdm(range(first, rounds + 1), desc=f"{self.cfg.server.method} rounds", initial=first - 1,
                        total=rounds, disable=self.rank != 0, file=sys.stdout, dynamic_ncols=True)
        for round_index in progress:
            try:
                record = self.run_round(round_index)
            except PeerLost as err:
                kept = f"the checkpoint of round {round_index - 1} is kept" if round_index > 1 else "nothing was lost"
                raise UserError(f"round {round_index}: {err}; {kept}: run the same command again to resume") from err
            if record is not None and record.scores is not None:
                progress.set_postfix(mean_acc=f"{100 * record.to_dict()['mean_accuracy']:.2f}%")
        if self.rank == 0:
            self.finish()
        return self.fabric.broadcast(self.results if self.rank == 0 else None, src=0)

    def run_round(self, round_index: int) -> RoundRecord | None:
        """One round on every rank; returns the round's record on rank 0 (None elsewhere)."""
        clock = time.perf_counter
        start = clock()
        sampled = sample_clients([c.id for c in self.data.clients], self.per_round, self.cfg.seed, round_index)
        steps = None
        if self.union is not None:  # the union trains what the sampled clients would have trained together
            steps = sum(local_steps(self.data.clients[c].num_samples, self.cfg.data.batch_size, self.cfg.client)
                        for c in sampled)
            sampled = [self.union.id]
        results, hosts, trained = self.train_clients(round_index, sampled, steps)
        answer = self.aggregate(round_index, results, sampled)
        self.apply(round_index, answer)
        applied = clock()
        last = round_index == self.cfg.federation.rounds
        scores = self.evaluate(round_index) if last or round_index % self.cfg.federation.eval_every == 0 else None
        evaluated = clock()
        record = None
        if self.rank == 0:
            comm = applied - trained - self.server_seconds
            seconds = {"train": trained - start, "comm": comm, "aggregate": self.server_seconds,
                       "eval": evaluated - applied, "round": evaluated - start}
            record = RoundRecord(round_index, sampled, hosts, answer.record, seconds, scores, items=last)
            self.save(round_index, record)
        self.transport.wait_for_all()  # the round is on disk before any rank starts the next
        return record

    def train_clients(self, round_index: int, sampled: list[int],
                      steps: int | None = None) -> tuple[list[ClientResult], dict[str, int], float]:
        """Each rank trains its share of `sampled` (for `steps` steps each; None: their own count): this rank's
        results, client id -> rank, and the clock when training ended on every rank. Under the local bound every
        rank then holds every trained client's state (`trained`), to take as its own once the round keeps it."""
        hosted = assign_to_ranks(sampled, {c: self.participants[c].num_samples for c in sampled}, self.world)
        results = [self.client.train(self.participants[c], self.own_states.get(c, self.global_state), round_index,
                                     self.client_ranks[c], steps)
                   for c in hosted[self.rank]]
        if self.setting == "local":
            own = {r.client: GlobalState({name: (a.cpu(), b.cpu()) for name, (a, b) in r.update.lora.items()},
                                         {name: t.cpu() for name, t in r.update.extra.items()}) for r in results}
            self.trained = {client: state for states in self.transport.share(own) for client, state in states.items()}
        self.transport.wait_for_all()
        trained = time.perf_counter()
        faults.maybe_fail(round_index, "gather")
        hosts = {str(client): rank for rank, clients in enumerate(hosted) for client in clients}
        return results, hosts, trained

    def aggregate(self, round_index: int, results: list[ClientResult], sampled: list[int]) -> ServerAnswer:
        """Every rank: the server's answer to the round, pre-reduced. Each rank folds its own `results` (slot =
        the client's index in `sampled`), the transport shares the reports and sums the folds, rank 0 finishes.
        Every client rank below the global one (those the global state holds starting pairs for) gets its pairs.
        server_seconds: this rank's folding and finishing, apart from the transport."""
        start = time.perf_counter()
        like = ClientUpdate(weight=1.0, lora=self.global_state.lora, extra=self.global_state.extra)
        slot = {client: index for index, client in enumerate(sampled)}
        fold = self.server.fold(round_index, results, [slot[r.client] for r in results], like, len(sampled),
                                sorted(self.global_state.by_rank))
        self.server_seconds = time.perf_counter() - start
        shared = self.transport.share((fold.reports, fold.refusal))
        reports = [report for rank_reports, _ in shared for report in rank_reports]
        record = self.server.decide(round_index, reports, [refusal for _, refusal in shared])
        if not record.skipped:
            self.transport.sum_over_ranks(fold.state.accumulators())
        return self.transport.from_server(lambda: self.finish_round(round_index, fold.state, record, reports),
                                          ServerAnswer)

    def finish_round(self, round_index: int, state: RoundState, record: ServerRecord,
                     reports: list[ClientReport]) -> ServerAnswer:
        """Rank 0: the answer from the fold summed over the ranks, timed into server_seconds."""
        start = time.perf_counter()
        faults.maybe_fail(round_index, "aggregate")
        answer = self.server.finish(round_index, state, record, reports)
        if self.setting != "federated":  # a bound sends nothing: the average only screened the updates
            answer.record.bytes_up = answer.record.bytes_down = 0
            answer.record.bytes_by_client, answer.record.aggregation = {}, {}
        self.server_seconds += time.perf_counter() - start
        return answer

    def apply(self, round_index: int, answer: ServerAnswer) -> None:
        """Every rank: take the server's answer as the next starting point (FLoRA: merge, then fresh LoRA)."""
        if answer.record.skipped:
            return
        if self.setting == "local":  # each client keeps its own update, if the round kept it
            self.own_states.update({client: state for client, state in self.trained.items()
                                    if str(client) not in answer.record.bad_updates})
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

    def evaluate(self, round_index: int) -> Scores:
        """Every rank: the global model's scores on every domain's test set; under the local bound, each client's
        own model on its own domain's (a domain's score is the mean over its clients)."""
        faults.maybe_fail(round_index, "eval")
        if self.setting != "local":
            return self.score([(self.global_state, None, self.data.domains)])
        return self.score([(self.own_states.get(c.id, self.global_state), self.client_ranks[c.id], [c.domain])
                           for c in self.data.clients])

    def score(self, models: list[tuple[GlobalState, int | None, list[str]]]) -> Scores:
        """Scores of (state, LoRA rank, domains whose test sets it is scored on) models; each rank takes a
        contiguous shard of every test set and the transport sums the shards."""
        sums, items, domains = [], [], []
        for state, rank, model_domains in models:
            model_sums, model_items = self.client.evaluation_sums(state, [self.data.test[d] for d in model_domains],
                                                                  (self.rank, self.world), rank)
            sums.append(model_sums)
            items += model_items
            domains += model_domains
        summed = torch.cat(sums)
        self.transport.sum_over_ranks([summed, *items])
        return Scores.of(self.data.domains, domains, summed.cpu(), [vector.cpu() for vector in items])

    def score_start(self) -> None:
        """Every rank: score the starting model (round 0: pretrained backbone, fresh LoRA and head) as the rounds
        are scored; rank 0 logs it to TensorBoard (step 0) and keeps it for results.json (written with round 1)."""
        entry = self.score([(self.global_state, None, self.data.domains)]).to_dict(items=True)
        if self.rank == 0:
            self.results["start"] = {"round": 0, **entry}
            self.fabric.log_dict(score_scalars(entry), step=0)

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
                        checkpoint_state(round_index, self.identity, self.results, self.global_state, base,
                                         self.own_states),
                        before_rename=lambda: faults.maybe_fail(round_index, "checkpoint"))

    def finish(self) -> None:
        """The final results.json, the hparams entry of TensorBoard, the accuracy table and the export."""
        from lorafair.export import export_run  # imported here: export builds its model with build_model

        self.results["final"] = final = final_accuracy(self.results)
        write_json(results_path(self.out_dir), self.results)
        metrics = {f"hparams/{key}": final[key] for key in ("mean_accuracy", "mean_eval_loss") if key in final}
        self.fabric.logger.log_hyperparams(flatten_config(self.results["config"]), metrics=metrics)
        self.fabric.logger.finalize("success")
        whose = "each client's own model" if self.setting == "local" else "global model"
        self.fabric.print(accuracy_table(final["accuracy"], final["mean_accuracy"],
                                         f"{self.results['method']}: {whose} after round {final['round']}",
                                         final.get("eval_loss"), self.results.get("start", {}).get("accuracy"),
                                         metric_name(self.cfg.data.name)))
        if self.setting == "local":
            self.fabric.print("local: no global model to export (each client kept its own)")
            return
        if not self.cfg.export:
            self.fabric.print(f"export false: no {EXPORT_NAME}/ written; `lorafair export --run {self.out_dir}` "
                              "writes it from the newest checkpoint")
            return
        export_run(self.out_dir, overwrite=True, say=self.fabric.print)

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
        self.own_states = resumed.client_states
        if resumed.base:
            self.model.load_base_state(resumed.base)
            self.merged = True
        if self.rank == 0:
            self.results["rounds"] = resumed.records
            if resumed.start is not None:
                self.results["start"] = resumed.start
            self.results["bad_updates_total"] = sum(len(r["bad_updates"]) for r in resumed.records)
            self.fabric.print(f"resuming after round {resumed.round} from {resumed.path}")
        return resumed.round + 1

    def read_resume_state(self) -> ResumeState | None:
        """Rank 0: None for a fresh start, else the checkpoint's state, checked against this run and model."""
        found = find_checkpoint(self.out_dir, self.cfg.resume, self.cfg.overwrite, self.fabric.print)
        if found is None:
            return None
        resumed = resume_state(*found, self.identity, self.cfg.federation.rounds, self.cfg.resume_force,
                               self.fabric.print)
        check_fits(resumed, state_shapes(self.model))
        return resumed


def final_accuracy(results: dict[str, Any]) -> dict[str, Any]:
    """The last evaluated round's scores (and eval losses, where reported), with the gain over the starting model
    (round 0) where the run scored it: the run's result."""
    last = next(record for record in reversed(results["rounds"]) if "accuracy" in record)
    final = {key: last[key] for key in ("round", "accuracy", "mean_accuracy", "eval_loss", "mean_eval_loss",
                                        "correct_items") if key in last}
    start = results.get("start")
    if start is not None:
        final["gain"] = {domain: value - start["accuracy"][domain] for domain, value in final["accuracy"].items()}
        final["mean_gain"] = final["mean_accuracy"] - start["mean_accuracy"]
    return final
