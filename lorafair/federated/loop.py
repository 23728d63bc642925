"""The round loop of `lorafair fit`, composing the client, the server and the transport on Lightning Fabric.

One round (`FederatedTrainer.run_round`):
    sample clients -> assign them to ranks -> each rank trains its clients (client role) by the method's client rule
    and folds their updates into the method's accumulators (server role) -> the transport shares the clients'
    reports (and what clients keep of their own) and sums the accumulators over the ranks -> rank 0 finishes the
    aggregation and the transport delivers its answer to every rank -> every rank applies it (merging into its frozen
    weights for FLoRA / FedEx-LoRA / FRLoRA) -> sharded evaluation (and each client's own model, where clients keep
    factors) -> results.json, TensorBoard and a checkpoint on rank 0.
After the last round rank 0 prints the accuracy table and hands the run folder to its `export` (`lorafair.fit`
passes the one that writes the global model to out_dir/final; not with export false).

What a client keeps between rounds is what its method's client rule keeps (nothing for most methods), held for every
client on every rank and in the checkpoints, and everything random is seeded by (seed, round, client), so the results
do not depend on the number of ranks, on which rank hosts a client, or on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from tqdm import tqdm

from lorafair.aggregation import (
    Aggregator,
    ClientRule,
    ClientUpdate,
    LocalAdapter,
    RoundState,
    gradient_start,
    ranks,
    svd_start,
)
from lorafair.config import BOUND_METHOD, FitConfig, metric_name
from lorafair.data import Client, FederatedData
from lorafair.data.build import build_data
from lorafair.errors import UserError
from lorafair.federated import faults
from lorafair.federated.bounds import LOCAL_RULE, local_steps, union_client
from lorafair.federated.checkpoints import checkpoint_state, read_resume, save_checkpoint
from lorafair.federated.client import LocalTrainer
from lorafair.federated.fingerprints import run_fingerprints
from lorafair.federated.results import RunResults
from lorafair.federated.run_folder import (
    EXPORT_NAME,
    checkpoint_dir,
    config_to_dict,
    flatten_config,
    trajectory_identity,
)
from lorafair.federated.sampling import assign_to_ranks, sample_clients
from lorafair.federated.server import ClientReport, Server
from lorafair.federated.state import (
    ClientResult,
    GlobalState,
    OwnState,
    ResumeState,
    RoundRecord,
    Scores,
    ServerAnswer,
    ServerRecord,
    is_local,
    kept_tensors,
)
from lorafair.federated.transport import PeerLost, TorchDistributedTransport
from lorafair.models.build import build_model
from lorafair.seeds import seeded_generator

Export = Callable[[Path, Callable[[str], None]], object]
"""Writes the global model of the run folder it is given, saying what it did with the function it is given."""


class FederatedTrainer:
    """The round loop: holds this rank's roles and the global state every client starts a round from. What it
    reports goes to `outputs` (results.json and TensorBoard, rank 0); a finished run's global model to `export`."""
    def __init__(self, cfg: FitConfig, fabric: Fabric, export: Export | None = None) -> None:
        method = cfg.server.method
        self.setting = cfg.federation.setting
        if self.setting != "federated":  # a bound takes its one update as it is: FedIT's average of one, or none
            method, cfg = self.setting, replace(cfg, server=replace(cfg.server, method=BOUND_METHOD))
        self.cfg, self.fabric, self.export = cfg, fabric, export
        self.out_dir = Path(cfg.out_dir)
        self.server_seconds = 0.0
        self.data = build_data(cfg)
        self.per_round = clients_per_round(cfg, len(self.data.clients))
        self.model = build_model(cfg, self.data.num_classes, fabric.device)
        self.union, self.participants, self.client_ranks = participants(cfg, self.data)
        self.own_states: dict[int, OwnState] = {}
        """What each client keeps of its own (`ClientRule.keeps` and a local adapter, `ClientRule.local`; the local
        bound: its whole state) after the last round it trained in; a client that has not trained yet holds the
        run's initial tensors."""
        self.trained: dict[int, OwnState] = {}
        """What the clients of this round keep, from every rank, until the round's answer says whose to keep."""
        self.pruned: dict[int, int] = {}
        """The clients of this round that lowered their rank (`Aggregator.self_prunes`), from every rank: client id
        -> its new rank, taken once the round's answer keeps its update."""
        self.lower_ranks = tuple(sorted(set(self.client_ranks.values()) - {cfg.lora.r}))
        self.global_state = self.state_of(self.fresh_lora("lora_init", cfg.seed), self.model.get_extra())
        self.initial_state = self.global_state
        """The run's starting model: what a client keeps before it first trains."""
        self.merged = False
        self.transport = TorchDistributedTransport(fabric.device)
        self.rank, self.world = self.transport.rank, self.transport.world
        self.client = LocalTrainer(self.model, fabric, cfg.client, cfg.data, cfg.seed, show_progress=self.rank == 0)
        self.server = Server(cfg.server, cfg.federation.on_bad_update, cfg.seed, log=fabric.print)
        self.basis: dict[str, torch.Tensor] | None = None
        """Layer -> A0, the fixed rows every client's A trains over where its method's clients train the core of A
        (`ClientRule.core`; set by `start_from_gradient`)."""
        aggregator = self.server.aggregator
        if aggregator.starts_from_weights:
            self.global_state = self.initial_state = self.start_from_weights()
        if aggregator.starts_from_gradient:
            self.global_state = self.initial_state = self.start_from_gradient(aggregator.init_batches)
        self.identity = trajectory_identity(flatten_config(config_to_dict(cfg)), run_fingerprints(self.data, cfg.model))
        self.outputs = RunResults.of_run(cfg, fabric, method, self.data.domains, self.participants.values())

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
        return self.fabric.broadcast(self.outputs.results if self.rank == 0 else None, src=0)

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
        evaluates = last or round_index % self.cfg.federation.eval_every == 0
        scores, personalised = self.evaluate(round_index) if evaluates else (None, None)
        evaluated = clock()
        record = None
        if self.rank == 0:
            comm = applied - trained - self.server_seconds
            seconds = {"train": trained - start, "comm": comm, "aggregate": self.server_seconds,
                       "eval": evaluated - applied, "round": evaluated - start}
            record = RoundRecord(round_index, sampled, hosts, answer.record, seconds, scores, personalised,
                                 items=last)
            self.save(round_index, record)
        self.transport.wait_for_all()  # the round is on disk before any rank starts the next
        return record

    def client_rule(self, round_index: int) -> ClientRule:
        """What the clients train, upload and keep in round `round_index`: the method's rule (the local bound's
        clients keep everything)."""
        return LOCAL_RULE if self.setting == "local" else self.server.client_rule(round_index)

    def start_state(self, client: int, rule: ClientRule) -> GlobalState:
        """What `client` starts a round of `rule` from: the global state, with what it keeps of its own in its place
        (before it first trained, the run's initial tensors)."""
        if not rule.personal:
            return self.global_state
        rank = self.client_ranks[client]
        own = self.own_states.get(client)
        return self.global_state.overlaid(own if own is not None else self.initial_state.kept(rule, rank), rank)

    def train_clients(self, round_index: int, sampled: list[int],
                      steps: int | None = None) -> tuple[list[ClientResult], dict[str, int], float]:
        """Each rank trains its share of `sampled` (for `steps` steps each; None: their own count) by the round's
        client rule: this rank's results, client id -> rank, and the clock when training ended on every rank. Where
        clients keep tensors of their own, every rank then holds what every trained client keeps (`trained`), to
        take as its own once the round keeps its update: a client may train on another rank next round."""
        rule = self.client_rule(round_index)
        hosted = assign_to_ranks(sampled, {c: self.participants[c].num_samples for c in sampled}, self.world)
        method = self.server.aggregator
        penalty = method.client_penalty if method.self_prunes else None
        results = [self.client.train(self.participants[c], self.start_state(c, rule), round_index,
                                     self.client_ranks[c], steps, rule.trains, penalty=penalty, local=rule.local,
                                     basis=self.basis if rule.core else None)
                   for c in hosted[self.rank]]
        self.pruned = {}
        if method.self_prunes:
            own_pruned = {r.client: self.prune(r, self.start_state(r.client, rule)) for r in results}
            self.pruned = {client: rank for shared in self.transport.share(own_pruned)
                           for client, rank in shared.items() if rank < self.client_ranks[client]}
        self.trained = {}
        if rule.personal:
            own = {r.client: {**kept_tensors(r.update.lora, r.update.extra, rule), **r.local} for r in results}
            self.trained = {client: state for states in self.transport.share(own) for client, state in states.items()}
        self.transport.wait_for_all()
        trained = time.perf_counter()
        faults.maybe_fail(round_index, "gather")
        hosts = {str(client): rank for rank, clients in enumerate(hosted) for client in clients}
        return results, hosts, trained

    def prune(self, result: ClientResult, start: GlobalState) -> int:
        """The rank `result`'s client keeps from this round on (`prune_update`)."""
        return prune_update(self.server.aggregator, result, start, self.client_ranks[result.client])

    def aggregate(self, round_index: int, results: list[ClientResult], sampled: list[int],
                  unreadable: dict[str, str] | None = None) -> ServerAnswer:
        """Every rank: the server's answer to the round, pre-reduced. Each rank folds its own `results` (slot =
        the client's index in `sampled`), the transport shares the reports and sums the folds, rank 0 finishes.
        Every client rank below the global one (those the global state holds starting pairs for) gets its pairs.
        unreadable: client id -> why, for sampled clients whose reply could not be read (bad updates too).
        server_seconds: this rank's folding and finishing, apart from the transport."""
        start = time.perf_counter()
        like = ClientUpdate(weight=1.0, lora=self.global_state.lora, extra=self.global_state.extra)
        slot = {client: index for index, client in enumerate(sampled)}
        fold = self.server.fold(round_index, results, [slot[r.client] for r in results], like, len(sampled),
                                sorted(self.global_state.by_rank))
        self.server_seconds = time.perf_counter() - start
        shared = self.transport.share((fold.reports, fold.refusal))
        reports = [report for rank_reports, _ in shared for report in rank_reports]
        record = self.server.decide(round_index, reports, [refusal for _, refusal in shared], unreadable)
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
        """Every rank: take the server's answer as the next starting point (FLoRA: merge, then fresh LoRA); each
        client keeps what its rule keeps, if the round kept its update. Where clients keep factors, the global
        model holds in their place the sample-weighted mean of what every client holds (`global_model`)."""
        if answer.record.skipped:
            return
        rule = self.client_rule(round_index)
        self.own_states.update({client: state for client, state in self.trained.items()
                                if str(client) not in answer.record.bad_updates})
        self.client_ranks.update({client: rank for client, rank in self.pruned.items()
                                  if str(client) not in answer.record.bad_updates})
        if self.setting == "local":
            return
        if answer.merge:
            self.model.merge(answer.merge)
            self.merged = True
        if answer.lora is None:
            self.global_state = self.state_of(self.fresh_lora("lora_reinit", self.cfg.seed, round_index), answer.extra)
        else:
            self.global_state = GlobalState(answer.lora, answer.extra, answer.by_rank)
        if rule.personal:
            self.global_state = self.global_model(rule)

    def global_model(self, rule: ClientRule) -> GlobalState:
        """The global state with what clients keep replaced by its mean over every client of the partition,
        weighted by sample count, each holding its own (the run's initial tensors before it first trained): the
        model a method whose clients keep factors is scored and exported as."""
        clients = self.data.clients
        total = sum(client.num_samples for client in clients)
        held = [(client.num_samples, self.own_states.get(client.id)) for client in clients]
        initial = {key: tensor for key, tensor in self.initial_state.kept(rule, self.cfg.lora.r).items()
                   if not is_local(key)}  # a local adapter is never part of the global model
        device = next(iter(self.global_state.lora.values()))[0].device
        mean = {key: (sum(count * (own if own is not None else initial)[key].to("cpu", torch.float64)
                          for count, own in held) / total).to(dtype=tensor.dtype, device=device)
                for key, tensor in initial.items()}
        model = self.global_state.overlaid(mean, self.cfg.lora.r)
        return self.state_of(model.lora, model.extra)

    def start_from_weights(self) -> GlobalState:
        """The run's start for a method that `starts_from_weights` (FRLoRA): each adapted layer's top-r SVD as its
        LoRA pair (in the LoRA factors' dtype), taken out of the frozen weight, so the starting model is the
        pretrained one. The frozen weights have changed: the checkpoints hold them from now on."""
        fresh = self.global_state.lora
        start = {name: tuple(factor.to(fresh[name][0]) for factor in svd_start(weight, self.cfg.lora.r,
                                                                               self.model.scaling))
                 for name, weight in self.model.base_state().items()}
        self.model.merge({name: (A, -B) for name, (A, B) in start.items()})
        self.merged = True
        return self.state_of(start, self.global_state.extra)

    def start_from_gradient(self, batches: int) -> GlobalState:
        """Every rank: the run's start for a method that `starts_from_gradient` (Fed-SB). Each client takes the
        gradient of the loss at the frozen weights of the pretrained model (B = 0) on `batches` batches of its own
        data (`LocalTrainer.weight_gradient`), the ranks sum their clients' shares into the sample-weighted mean G
        (one exchange before round 1), and each layer starts from LoRA-SB's cut of the first SGD step -lr G
        (`gradient_start`): A = R0 A0, B = B0, A0 kept in `basis`. A resumed run takes the same start again."""
        clients = self.data.clients
        total = sum(client.num_samples for client in clients)
        hosted = assign_to_ranks([client.id for client in clients],
                                 {client.id: client.num_samples for client in clients}, self.world)
        gradient = {name: torch.zeros(weight.shape, dtype=torch.float64, device=self.fabric.device)
                    for name, weight in self.model.frozen_weights().items()}
        for client_id in hosted[self.rank]:
            client = self.participants[client_id]
            for name, share in self.client.weight_gradient(client, self.global_state, batches).items():
                gradient[name] += share * (client.num_samples / total)
        self.transport.sum_over_ranks(list(gradient.values()))
        return self.cut_gradient_start(gradient)

    def cut_gradient_start(self, gradient: dict[str, torch.Tensor]) -> GlobalState:
        """The start LoRA-SB cuts from each layer's sample-weighted mean `gradient` G over every client
        (`gradient_start`), in the dtypes of the run's initial LoRA and head: A = R0 A0, B = B0, A0 kept in
        `basis`, contiguous (the SVD returns a transposed view), as it travels to a Flower node, so that training
        over it rounds alike there."""
        fresh, start, self.basis = self.initial_state.lora, {}, {}
        for name, summed in gradient.items():
            R0, A0, B0 = gradient_start(summed, self.cfg.lora.r, self.model.scaling, self.cfg.client.lr)
            self.basis[name] = A0.to(fresh[name][0]).contiguous()
            start[name] = ((R0 @ A0).to(fresh[name][0]), B0.to(fresh[name][1]))
        return self.state_of(start, self.initial_state.extra)

    def state_of(self, lora: dict, extra: dict) -> GlobalState:
        """A global state whose lower-rank clients start from the leading components of `lora` (a fresh LoRA)."""
        return GlobalState(lora, extra, {rank: {name: ranks.to_client(pair, rank) for name, pair in lora.items()}
                                         for rank in self.lower_ranks})

    def fresh_lora(self, *seed_parts: int | str) -> dict:
        """A fresh LoRA start (A random, B zero) from a generator every rank seeds alike."""
        self.model.init_lora(seeded_generator(*seed_parts))
        return self.model.get_lora()

    def evaluate(self, round_index: int) -> tuple[Scores, Scores | None]:
        """Every rank: the global model's scores on every domain's test set, and where clients keep tensors of their
        own, each client's own model (what it starts the next round from) on its own domain's test set (a domain's
        score is the mean over its clients), else None. The local bound has no global model: its scores are the
        clients' own models'."""
        faults.maybe_fail(round_index, "eval")
        rule = self.client_rule(round_index + 1)
        own = [(self.start_state(c.id, rule), self.client_ranks[c.id], [c.domain]) for c in self.data.clients]
        if self.setting == "local":
            return self.score(own), None
        scores = self.score([(self.global_state, None, self.data.domains)])
        return scores, self.score(own, rule.local) if rule.personal else None

    def score(self, models: list[tuple[GlobalState, int | None, list[str]]], local: LocalAdapter | None = None
              ) -> Scores:
        """Scores of (state, LoRA rank, domains whose test sets it is scored on) models, each mixing its local
        adapter in by `local` where it holds one; each rank takes a contiguous shard of every test set and the
        transport sums the shards."""
        sums, items, domains = [], [], []
        for state, rank, model_domains in models:
            model_sums, model_items = self.client.evaluation_sums(state, [self.data.test[d] for d in model_domains],
                                                                  (self.rank, self.world), rank, local)
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
            self.outputs.start(entry)

    # ---- outputs and checkpoints (rank 0) ------------------------------------------------------------------------

    def save(self, round_index: int, record: RoundRecord) -> None:
        """results.json, TensorBoard scalars, then the checkpoint of this round."""
        self.outputs.add(record, last=round_index == self.cfg.federation.rounds)
        base = self.model.base_state() if self.merged else None
        ranks_kept = self.client_ranks if self.server.aggregator.self_prunes else None
        state = checkpoint_state(round_index, self.identity, self.outputs.results, self.global_state, base,
                                 self.own_states, ranks_kept)
        save_checkpoint(checkpoint_dir(self.out_dir), round_index, state,
                        before_rename=lambda: faults.maybe_fail(round_index, "checkpoint"))

    def finish(self) -> None:
        """The final results.json, the hparams entry of TensorBoard, the accuracy table and the export."""
        self.outputs.finish("each client's own model" if self.setting == "local" else "global model",
                            metric_name(self.cfg.data.name))
        if self.setting == "local":
            self.fabric.print("local: no global model to export (each client kept its own)")
            return
        if not self.cfg.export:
            self.fabric.print(f"export false: no {EXPORT_NAME}/ written; `lorafair export --run {self.out_dir}` "
                              "writes it from the newest checkpoint")
            return
        if self.export is not None:
            self.export(self.out_dir, self.fabric.print)

    def start_or_resume(self) -> int:
        """Every rank: the first round to run. Rank 0 writes config.yaml and classes.json, reads the checkpoint
        to resume from (if any) and the transport sends its state to the other ranks (no shared disk needed)."""
        resumed = self.transport.from_server(
            lambda: read_resume(self.out_dir, self.cfg, self.identity, self.model, self.fabric.print), ResumeState)
        if self.rank == 0:
            self.outputs.write_settings(self.cfg, self.data.classes)
        if resumed is None:
            return 1
        self.global_state = resumed.state
        # held on the CPU, as the clients' own tensors are kept in a run that was not interrupted
        self.own_states = {client: {key: tensor.cpu() for key, tensor in own.items()}
                           for client, own in resumed.client_states.items()}
        self.client_ranks.update(resumed.client_ranks)
        if resumed.base:
            self.model.load_base_state(resumed.base)
            self.merged = True
        if self.rank == 0:
            self.outputs.resume(resumed)
        return resumed.round + 1


def prune_update(method: Aggregator, result: ClientResult, start: GlobalState, rank: int) -> int:
    """The rank a client of LoRA `rank` keeps from this round on (`Aggregator.pruned_rank` of the pairs it started
    from and those it trained); below its rank, its update (`result`, changed in place) becomes its leading
    components, in their scaling. The client's part of rank self-pruning, wherever the client trains."""
    kept = method.pruned_rank(start.lora_for(rank), result.update.lora)
    if kept < rank:
        result.update = replace(result.update, lora={name: ranks.to_client(pair, kept)
                                                     for name, pair in result.update.lora.items()})
    return kept


def clients_per_round(cfg: FitConfig, clients: int) -> int:
    """How many of the partition's `clients` train each round."""
    per_round = cfg.federation.clients_per_round or clients
    if per_round > clients:
        raise UserError(f"federation.clients_per_round: {per_round} is more than the {clients} clients of this "
                        f"partition; lower it (or null for all)")
    return per_round


def participants(cfg: FitConfig, data: FederatedData) -> tuple[Client | None, dict[int, Client], dict[int, int]]:
    """(the centralized bound's one client holding every client's data, or None; who trains: the clients, or that
    one client; participant id -> LoRA rank)."""
    clients = data.clients
    client_ranks = cfg.lora.rank_of([(c.id, c.domain) for c in clients], data.domains)
    union = union_client(clients) if cfg.federation.setting == "centralized" else None
    if union is not None:
        client_ranks[union.id] = cfg.lora.r
    return union, {c.id: c for c in ([union] if union else clients)}, client_ranks
