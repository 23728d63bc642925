"""`lorafair fit`: federated LoRA fine-tuning on Lightning Fabric, rank 0 doubling as the server.

One round (`FederatedTrainer.run_round`), each arrow a method call:
    sample clients -> assign them to ranks -> each rank trains its clients one after another on its one backbone,
    swapping their small state in (LoRA factors and head; SGD momentum starts fresh every round, as in the public
    code) -> updates gathered to rank 0 as flat buffers -> aggregate -> broadcast -> every rank applies the global
    update (and merges into its frozen weights for FLoRA / FedEx-LoRA) -> sharded evaluation -> results.json,
    TensorBoard and a checkpoint on rank 0.

Clients keep no state between rounds and everything random is seeded by (seed, round, client), so the results do
not depend on the number of ranks, on which rank hosts a client, or on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import Subset
from tqdm import tqdm

from lorafair import comm, faults
from lorafair.aggregation import ClientUpdate, build_aggregator, find_bad_updates, method_options
from lorafair.checkpoint import (
    first_shape_mismatch,
    identity_differences,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    partition_fingerprint,
    save_checkpoint,
    trajectory_identity,
)
from lorafair.config import FitConfig
from lorafair.data import Client, build_federated_data, make_loader, model_data_config
from lorafair.errors import UserError
from lorafair.federation import assign_to_ranks, derive_seed, sample_clients
from lorafair.model import LoraClassifier
from lorafair.results import (
    accuracy_table,
    config_to_dict,
    flatten_dict,
    mean,
    tensorboard_scalars,
    write_json,
    write_yaml,
)

CHECKPOINT_KEYS = frozenset({"round", "identity", "results", "lora", "extra", "base"})

META = ("client", "num_samples", "train_loss", "steps", "skipped_images")
"""What travels to the server beside each client's factors, one float64 per entry."""


def fit(cfg: FitConfig) -> dict[str, Any]:
    """Run the federated job of `cfg` and return the content of its results.json (on every rank)."""
    fabric = launch_fabric(cfg)
    results = FederatedTrainer(cfg, fabric).run()
    comm.close()
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
    logger = TensorBoardLogger(root_dir=cfg.out_dir, name="tensorboard", version="", default_hp_metric=False)
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


def aggregator_options(cfg: FitConfig, round_index: int = 0) -> dict[str, Any]:
    """The method's options taken from the server section, and a seed of (run seed, round) where the method draws
    randoms: a round's draws then do not depend on the rounds before it, so a resumed run repeats them."""
    settings = {**vars(cfg.server), "seed": derive_seed("server", cfg.seed, round_index)}
    return {name: settings[name] for name in method_options(cfg.server.method) if name in settings}


class FederatedTrainer:
    """Holds the one backbone of this rank, the global state every client starts a round from, and the results."""

    def __init__(self, cfg: FitConfig, fabric: Fabric) -> None:
        self.cfg, self.fabric = cfg, fabric
        self.rank, self.world = fabric.global_rank, fabric.world_size
        self.device = fabric.device
        self.out_dir = Path(cfg.out_dir)
        self.data = build_federated_data(cfg.data, cfg.federation, cfg.seed,
                                         model_data_config(cfg.model, cfg.data.image_size))
        clients = self.data.clients
        self.per_round = cfg.federation.clients_per_round or len(clients)
        if self.per_round > len(clients):
            raise UserError(f"federation.clients_per_round: {self.per_round} is more than the {len(clients)} clients "
                            f"of this partition; lower it (or null for all)")
        # identical random parts (head, LoRA, a backbone without weights) on every rank
        torch.manual_seed(derive_seed("model", cfg.seed))
        self.model = LoraClassifier(cfg.model, cfg.lora, self.data.num_classes, cfg.client).to(self.device)
        self.aggregator = build_aggregator(cfg.server.method, **aggregator_options(cfg))
        if cfg.server.method == "ffa_lora":
            self.model.freeze_lora_A(True)
        self.global_lora = self._fresh_lora("lora_init", cfg.seed)
        self.global_extra = self.model.get_extra()
        self.merged = False
        self.payload_shapes = {**{f"{name}.{factor}": tensor.shape for name, pair in self.global_lora.items()
                                  for factor, tensor in zip("AB", pair, strict=True)},
                               **{name: tensor.shape for name, tensor in self.global_extra.items()}}
        self.payload_width = sum(torch.Size(shape).numel() for shape in self.payload_shapes.values())
        self.identity = trajectory_identity(flatten_dict(config_to_dict(cfg)), partition_fingerprint(
            (c.id, c.domain, c.num_samples, c.class_counts) for c in clients))
        self.results: dict[str, Any] = {
            "method": cfg.server.method, "seed": cfg.seed, "config": config_to_dict(cfg), "domains": self.data.domains,
            "clients": [{"id": c.id, "domain": c.domain, "num_samples": c.num_samples} for c in clients],
            "rounds": [], "bad_updates_total": 0,
        }

    # ---- the run --------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        rounds = self.cfg.federation.rounds
        first = self.start_or_resume()
        progress = tqdm(range(first, rounds + 1), desc=f"{self.cfg.server.method} rounds", initial=first - 1,
                        total=rounds, disable=self.rank != 0, file=sys.stdout, dynamic_ncols=True)
        for round_index in progress:
            record = self.run_round(round_index)
            if "mean_accuracy" in record:
                progress.set_postfix(mean_acc=f"{100 * record['mean_accuracy']:.2f}%")
        if self.rank == 0:
            self.results["final"] = final_accuracy(self.results)
            write_json(self.out_dir / "results.json", self.results)
            final = self.results["final"]
            self.fabric.logger.log_hyperparams(flatten_dict(self.results["config"]),
                                               metrics={"hparams/mean_accuracy": final["mean_accuracy"]})
            self.fabric.logger.finalize("success")
            self.fabric.print(accuracy_table(final["accuracy"], final["mean_accuracy"],
                                             f"{self.cfg.server.method}: global model after round {final['round']}"))
        return self.fabric.broadcast(self.results if self.rank == 0 else None, src=0)

    def run_round(self, round_index: int) -> dict[str, Any]:
        """One round on every rank; returns the round's record (complete on rank 0)."""
        clock = time.perf_counter
        start = clock()
        sampled = sample_clients([c.id for c in self.data.clients], self.per_round, self.cfg.seed, round_index)
        hosted = assign_to_ranks(sampled, {c.id: c.num_samples for c in self.data.clients}, self.world)
        payloads, metas = [], []
        for client_id in hosted[self.rank]:
            payload, meta = self.train_client(self.data.clients[client_id], round_index)
            payloads.append(payload)
            metas.append(meta)
        comm.barrier()
        trained = clock()

        faults.maybe_fail(round_index, "gather", self.rank)
        counts = [len(clients) for clients in hosted]
        rows = comm.gather_rows(torch.stack(payloads) if payloads else torch.zeros(0, self.payload_width,
                                                                                   device=self.device),
                                counts)
        meta_rows = comm.gather_rows(torch.tensor(metas, dtype=torch.float64, device=self.device).view(-1, len(META)),
                                     counts)
        gathered = clock()

        tensors, info = self.aggregate(round_index, rows, meta_rows) if self.rank == 0 else (None, None)
        aggregated = clock()
        tensors, info = comm.broadcast_named(tensors, info, self.device)
        self.apply(round_index, tensors, info)
        applied = clock()

        evaluate = round_index % self.cfg.federation.eval_every == 0 or round_index == self.cfg.federation.rounds
        accuracy = self.evaluate(round_index) if evaluate else None
        evaluated = clock()
        record = {"round": round_index}
        if self.rank == 0:
            seconds = {"train": trained - start, "comm": (gathered - trained) + (applied - aggregated),
                       "aggregate": aggregated - gathered, "eval": evaluated - applied, "round": evaluated - start}
            ranks = {str(client): rank for rank, clients in enumerate(hosted) for client in clients}
            record.update(clients=sampled, ranks=ranks, **info["record"], seconds=seconds,
                          overhead=(seconds["comm"] + seconds["aggregate"]) / seconds["round"])
            if accuracy is not None:
                record["accuracy"] = accuracy
                record["mean_accuracy"] = mean(list(accuracy.values()))
            self.save(round_index, record)
        comm.barrier()  # the round is on disk before any rank starts the next: a failure there resumes after it
        return record

    # ---- one client -----------------------------------------------------------------------------------------

    def train_client(self, client: Client, round_index: int) -> tuple[Tensor, list[float]]:
        """Local SGD from the global state; returns the flat (factors, head) buffer and the META values."""
        cfg = self.cfg
        seed = derive_seed("client", cfg.seed, round_index, client.id)
        torch.manual_seed(seed)
        model = self.model
        model.set_lora(self.global_lora)
        model.set_extra(self.global_extra)
        model.train()
        optimizer = model.configure_optimizers()
        trainable = [p for p in model.parameters() if p.requires_grad]
        loader = make_loader(client.dataset, cfg.data.batch_size, shuffle=True, seed=seed,
                             num_workers=cfg.data.num_workers)
        total_steps = cfg.client.local_epochs * len(loader)
        if cfg.client.max_local_steps is not None:
            total_steps = min(total_steps, cfg.client.max_local_steps)
        loss_sum, steps = torch.zeros((), device=self.device), 0
        # per-client bars only on a terminal: in a log file they would bury the round bar
        bar = tqdm(total=total_steps, desc=f"round {round_index} client {client.id}", leave=False,
                   disable=self.rank != 0 or not sys.stdout.isatty(), file=sys.stdout, dynamic_ncols=True)
        for _ in range(math.ceil(total_steps / len(loader))):  # no loader is started for epochs past the cap
            for images, labels in loader:
                if steps == total_steps:
                    break
                with self.fabric.autocast():
                    loss = model.training_step((images.to(self.device), labels.to(self.device)), steps)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.client.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.client.grad_clip)
                optimizer.step()
                loss_sum += loss.detach().float()
                steps += 1
                bar.update()
                if steps == 1:
                    faults.maybe_fail(round_index, "train", self.rank)
        bar.close()
        lora = model.get_lora()
        payload = comm.flatten({**{f"{name}.{factor}": tensor for name, pair in lora.items()
                                   for factor, tensor in zip("AB", pair, strict=True)}, **model.get_extra()})
        if faults.is_poisoned(round_index, client.id):
            payload[0] = float("nan")
        train_loss = loss_sum.item() / steps if steps else float("nan")
        return payload, [client.id, client.num_samples, train_loss, steps, loader.skipped]

    # ---- the server and the global state --------------------------------------------------------------------

    def aggregate(self, round_index: int, rows: Tensor, meta_rows: Tensor) -> tuple[dict[str, Tensor], dict]:
        """Rank 0: aggregate the round's updates (in client order, whatever rank sent them) into the tensors every
        rank applies, and the round's record fields. Errors travel in `info` so every rank stops together."""
        faults.maybe_fail(round_index, "aggregate", self.rank)
        if "seed" in method_options(self.cfg.server.method):
            self.aggregator = build_aggregator(self.cfg.server.method, **aggregator_options(self.cfg, round_index))
        metas = [dict(zip(META, row, strict=True)) for row in meta_rows.tolist()]
        order = sorted(range(len(metas)), key=lambda i: metas[i]["client"])
        client_ids = [int(metas[i]["client"]) for i in order]
        updates = []
        for i in order:
            flat = comm.unflatten(rows[i], self.payload_shapes)
            lora = {name: (flat[f"{name}.A"], flat[f"{name}.B"]) for name in self.global_lora}
            extra = {name: flat[name] for name in self.global_extra}
            updates.append(ClientUpdate(weight=metas[i]["num_samples"], lora=lora, extra=extra))
        losses = [metas[i]["train_loss"] for i in order]
        bad = {position: f"local train loss is {loss}" for position, loss in enumerate(losses)
               if not math.isfinite(loss)}
        bad.update(find_bad_updates(updates))
        bad_clients = {str(client_ids[position]): reason for position, reason in sorted(bad.items())}
        record = {"train_loss": {str(c): loss for c, loss in zip(client_ids, losses, strict=True)},
                  "train_steps": {str(c): int(metas[i]["steps"]) for c, i in zip(client_ids, order, strict=True)},
                  "skipped_images": int(sum(meta["skipped_images"] for meta in metas)),
                  "bad_updates": bad_clients, "bytes_up": 0, "bytes_down": 0, "aggregation": {}}
        if bad_clients:
            described = "; ".join(f"client {c}: {reason}" for c, reason in bad_clients.items())
            if self.cfg.federation.on_bad_update == "error":
                return {}, {"error": f"round {round_index}: bad client update ({described}); federation.on_bad_update"
                                     f"=error stops the run, 'drop' leaves such clients out of the round"}
            self.fabric.print(f"warning: round {round_index}: dropping {len(bad_clients)} bad update(s), the "
                              f"others are re-weighted: {described}")
        good = [update for position, update in enumerate(updates) if position not in bad]
        record["skipped"] = not good
        if not good:
            self.fabric.print(f"warning: round {round_index}: no usable update, the global model stays as it was")
            return {}, {"skipped": True, "record": record}
        try:
            result = self.aggregator.aggregate(good)
        except ValueError as err:  # e.g. FFA-LoRA clients whose A differ: every rank stops with this message
            return {}, {"error": f"round {round_index}: aggregation failed: {err}"}
        tensors: dict[str, Tensor] = {}
        for kind, pairs in (("lora", result.lora), ("merge", result.merge)):
            for name, (lora_a, lora_b) in (pairs or {}).items():
                tensors[f"{kind}/{name}/A"], tensors[f"{kind}/{name}/B"] = lora_a, lora_b
        tensors.update({f"extra/{name}": tensor for name, tensor in result.extra.items()})
        record.update(bytes_up=int(result.bytes_up), bytes_down=int(result.bytes_down),
                      aggregation={name: float(value) for name, value in result.metrics.items()})
        return tensors, {"skipped": False, "record": record}

    def apply(self, round_index: int, tensors: dict[str, Tensor], info: dict) -> None:
        """Every rank: take the server's answer as the next starting point (FLoRA: merge, then fresh LoRA)."""
        if "error" in info:
            raise UserError(info["error"])
        if info["skipped"]:
            return
        lora, merge = unpack_pairs(tensors, "lora"), unpack_pairs(tensors, "merge")
        if merge:
            self.model.merge(merge)
            self.merged = True
        self.global_lora = lora if lora else self._fresh_lora("lora_reinit", self.cfg.seed, round_index)
        self.global_extra = unpack(tensors, "extra")

    def _fresh_lora(self, *seed_parts: int | str) -> dict[str, tuple[Tensor, Tensor]]:
        """A fresh LoRA start (A random, B zero) from a generator every rank seeds alike."""
        self.model.init_lora(torch.Generator().manual_seed(derive_seed(*seed_parts)))
        return self.model.get_lora()

    # ---- evaluation -----------------------------------------------------------------------------------------

    def evaluate(self, round_index: int) -> dict[str, float]:
        """Top-1 of the global model per domain; each rank takes a contiguous shard of every test set."""
        faults.maybe_fail(round_index, "eval", self.rank)
        model = self.model
        model.set_lora(self.global_lora)
        model.set_extra(self.global_extra)
        model.eval()
        counts = torch.zeros(len(self.data.domains), 2, dtype=torch.float64, device=self.device)
        with torch.inference_mode():
            self._count_correct(counts)
        model.val_accuracy.reset()
        comm.all_reduce_sum(counts)
        return {domain: (counts[i, 0] / counts[i, 1]).item() for i, domain in enumerate(self.data.domains)}

    def _count_correct(self, counts: Tensor) -> None:
        """Add (correct, total) of this rank's shard of each domain's test set to counts[domain]."""
        for position, domain in enumerate(self.data.domains):
            test = self.data.test[domain]
            size = len(test)
            shard = Subset(test, range(self.rank * size // self.world, (self.rank + 1) * size // self.world))
            loader = make_loader(shard, self.cfg.data.eval_batch_size, shuffle=False, seed=0,
                                 num_workers=self.cfg.data.num_workers)
            for batch_index, (images, labels) in enumerate(loader):
                with self.fabric.autocast():
                    correct, total = self.model.validation_step((images.to(self.device), labels.to(self.device)),
                                                                batch_index)
                counts[position, 0] += correct
                counts[position, 1] += total

    # ---- outputs and checkpoints ----------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self, round_index: int, record: dict[str, Any]) -> None:
        """Rank 0: results.json, TensorBoard scalars, then the checkpoint of this round."""
        self.results["rounds"].append(record)
        self.results["bad_updates_total"] += len(record["bad_updates"])
        if round_index == self.cfg.federation.rounds:
            self.results["final"] = final_accuracy(self.results)
        write_json(self.out_dir / "results.json", self.results)
        self.fabric.log_dict({**tensorboard_scalars(record), "bad_updates_total": self.results["bad_updates_total"]},
                             step=round_index)
        state = {"round": round_index, "identity": self.identity, "results": self.results,
                 "lora": {name: {"A": a.cpu(), "B": b.cpu()} for name, (a, b) in self.global_lora.items()},
                 "extra": {name: t.cpu() for name, t in self.global_extra.items()},
                 "base": {name: t.cpu() for name, t in self.model.base_state().items()} if self.merged else None}
        save_checkpoint(self.checkpoint_dir, round_index, state,
                        before_rename=lambda: faults.maybe_fail(round_index, "checkpoint", self.rank))

    def start_or_resume(self) -> int:
        """Every rank: the first round to run. Rank 0 writes config.yaml and classes.json, reads the checkpoint
        to resume from (if any) and sends its state to the other ranks, so they need no shared file system."""
        tensors, info = self._read_resume_state() if self.rank == 0 else (None, None)
        tensors, info = comm.broadcast_named(tensors, info, self.device)
        if "error" in info:
            raise UserError(info["error"])
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_yaml(self.out_dir / "config.yaml", config_to_dict(self.cfg))
            write_json(self.out_dir / "classes.json", self.data.classes)
        if "round" not in info:
            return 1
        self.global_lora = unpack_pairs(tensors, "lora")
        self.global_extra = unpack(tensors, "extra")
        base = unpack(tensors, "base")
        if base:
            self.model.load_base_state(base)
            self.merged = True
        if self.rank == 0:
            self.results["rounds"] = info["results"]["rounds"]
            self.results["bad_updates_total"] = sum(len(r["bad_updates"]) for r in self.results["rounds"])
            self.fabric.print(f"resuming after round {info['round']} from {info['path']}")
        return info["round"] + 1

    def _read_resume_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Rank 0: ({}, {}) for a fresh start, the checkpoint's tensors and info to resume, or {"error": ...}."""
        resume = self.cfg.resume
        if resume is None:
            stale = list_checkpoints(self.checkpoint_dir)
            if stale:
                self.fabric.print(f"starting a new run in {self.out_dir}: removing {len(stale)} checkpoint(s) of an "
                                  f"earlier run there (pass --resume auto to continue it instead)")
                for path in stale:
                    path.unlink()
            (self.out_dir / "results.json").unlink(missing_ok=True)  # a stale "final" would read as this run's
            return {}, {}
        try:
            if resume == "auto":
                found = load_latest(self.checkpoint_dir, self.fabric.print)
                if found is None:
                    self.fabric.print(f"no checkpoint in {self.checkpoint_dir}: starting from round 1")
                    return {}, {}
                path, state = found
            else:
                path, state = Path(resume), load_checkpoint(Path(resume))
        except UserError as err:
            return {}, {"error": str(err)}
        missing = sorted(CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else sorted(CHECKPOINT_KEYS)
        if missing:
            return {}, {"error": f"resume: {path} is not a lorafair checkpoint (it lacks {', '.join(missing)})"}
        differences = identity_differences(state["identity"], self.identity)
        if differences and not self.cfg.resume_force:
            return {}, {"error": f"resume: {path} was written by a run with other settings ({'; '.join(differences)});"
                                 f" resume with the same settings, start a new run in another out_dir, or pass "
                                 f"--resume_force true to continue anyway (the results then match no single run)"}
        if differences:
            self.fabric.print(f"warning: resume_force: continuing from {path}, written with other settings "
                              f"({'; '.join(differences)})")
        if state["round"] > self.cfg.federation.rounds:
            return {}, {"error": f"federation.rounds: {self.cfg.federation.rounds} is fewer than the {state['round']} "
                                 f"rounds already done in {path}; raise it"}
        try:
            tensors = {f"lora/{name}/{factor}": pair[factor] for name, pair in state["lora"].items() for factor in "AB"}
            tensors.update({f"extra/{name}": t for name, t in state["extra"].items()})
            tensors.update({f"base/{name}": t for name, t in (state["base"] or {}).items()})
        except (KeyError, TypeError, AttributeError) as err:
            return {}, {"error": f"resume: {path} is not a lorafair checkpoint (its tensors are malformed: {err!r})"}
        base = self.model.base_state() if state["base"] else {}
        expected = {**{f"lora/{name}/{factor}": t.shape for name, pair in self.global_lora.items()
                       for factor, t in zip("AB", pair, strict=True)},
                    **{f"extra/{name}": t.shape for name, t in self.global_extra.items()},
                    **{f"base/{name}": t.shape for name, t in base.items()}}
        mismatch = first_shape_mismatch(tensors, expected)
        if mismatch:
            return {}, {"error": f"resume: {path} does not fit this model: {mismatch}; resume with the model and "
                                 f"LoRA settings it was written with"}
        return tensors, {"round": state["round"], "results": state["results"], "path": str(path)}


def unpack(tensors: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """{"extra/head.weight": t, ...} -> {"head.weight": t} for one kind of the broadcast tensors."""
    return {key[len(kind) + 1:]: tensor for key, tensor in tensors.items() if key.startswith(f"{kind}/")}


def unpack_pairs(tensors: dict[str, Tensor], kind: str) -> dict[str, tuple[Tensor, Tensor]]:
    """{"lora/blocks.0.attn.proj/A": A, ".../B": B} -> {"blocks.0.attn.proj": (A, B)} for one kind."""
    names = [key[len(kind) + 1:-2] for key in tensors if key.startswith(f"{kind}/") and key.endswith("/A")]
    return {name: (tensors[f"{kind}/{name}/A"], tensors[f"{kind}/{name}/B"]) for name in names}


def final_accuracy(results: dict[str, Any]) -> dict[str, Any]:
    """The last evaluated round's accuracies: the run's result."""
    last = next(record for record in reversed(results["rounds"]) if "accuracy" in record)
    return {"round": last["round"], "accuracy": last["accuracy"], "mean_accuracy": last["mean_accuracy"]}
