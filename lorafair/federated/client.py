"""The client role: train one client from the global state and return its update and statistics; evaluate.

It knows nothing of ranks, processes or transports, and nothing of images: it drives any `ClientModel`, a
LightningModule-like model whose batches it moves to the device and whose trainable state is LoRA pairs plus extra
tensors (`lorafair.models.image.LoraClassifier` for timm backbones; a text model offers the same methods). One model
hosts every client of a process, one after another, by swapping that small state in.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from lightning.fabric import Fabric
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from lorafair.aggregation import ClientUpdate, LocalAdapter
from lorafair.config import ClientConfig, DataConfig
from lorafair.data import Client, evaluation_loaders, make_loader
from lorafair.federated import faults
from lorafair.federated.bounds import local_steps
from lorafair.federated.state import ClientResult, GlobalState
from lorafair.keys import LOCAL, LOCAL_FEATURES, Pairs, pack_pairs, unpack_pairs
from lorafair.seeds import derive_seed

Penalty = Callable[[Pairs], Tensor | None]
"""A term a method's clients add to their training loss, of the live LoRA pairs (`Aggregator.client_penalty`)."""

EVALUATION_SUMS = 4
"""Columns of `LocalTrainer.evaluation_sums`: correct, total, loss sum, loss terms."""


class ClientModel(Protocol):
    """What the client role needs from a model (LightningModule hooks plus the swappable federated state). A method
    whose clients keep a local adapter (`ClientRule.local`) needs more of it: `set_local_lora`, `get_local_lora`,
    `mix_adapters`, `train_local` (`lorafair.models.lora.PeftLoraState`) and `representations` (the image and
    the text model)."""

    def set_rank(self, rank: int) -> None: ...
    def train_factors(self, factors: str) -> None: ...
    def core_only(self, basis: dict[str, Tensor] | None) -> AbstractContextManager[None]: ...
    def frozen_weights(self) -> dict[str, nn.Parameter]: ...
    def get_lora(self) -> Pairs: ...
    def lora_parameters(self) -> Pairs:
        """The live LoRA parameters at the current rank, for a penalty that training differentiates."""
    def set_lora(self, lora: Pairs) -> None: ...
    def get_extra(self) -> dict[str, Tensor]: ...
    def set_extra(self, extra: dict[str, Tensor]) -> None: ...
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor: ...
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> tuple[Tensor, ...]:
        """(whether each item of the batch is right,) as a bool tensor, or (whether each item is right, loss sum,
        loss terms) for a model that also reports an eval loss (a language model on instruction data)."""
    def configure_optimizers(self) -> torch.optim.Optimizer: ...
    def parameters(self) -> Iterable[nn.Parameter]: ...
    def train(self, mode: bool = True) -> nn.Module: ...
    def eval(self) -> nn.Module: ...
    def on_validation_epoch_end(self) -> None: ...


class LocalTrainer:
    """Local SGD of one client at a time on one model; Fabric gives it the device and the autocast precision."""

    def __init__(self, model: ClientModel, fabric: Fabric, client_cfg: ClientConfig, data_cfg: DataConfig,
                 seed: int, show_progress: bool = True) -> None:
        self.model, self.fabric = model, fabric
        self.client_cfg, self.data_cfg, self.seed = client_cfg, data_cfg, seed
        self.show_progress = show_progress
        self.eval_loaders: dict[tuple, list] = {}
        self.global_rank = len(next(iter(model.get_lora().values()))[0])

    def load(self, state: GlobalState, rank: int | None = None) -> None:
        """The model at `state` as a client of `rank` sees it (None: the global model)."""
        rank = rank or self.global_rank
        self.model.set_rank(rank)
        self.model.set_lora(state.lora_for(rank))
        self.model.set_extra(state.extra)
        if state.local or getattr(self.model, "local_factors", None) is not None:
            self.model.set_local_lora(unpack_pairs(state.local, LOCAL) or None)

    def train(self, client: Client, start: GlobalState, round_index: int, rank: int | None = None,
              steps: int | None = None, factors: str = "AB", penalty: Penalty | None = None,
              local: LocalAdapter | None = None, basis: dict[str, Tensor] | None = None) -> ClientResult:
        """Local SGD from `start` at the client's LoRA `rank` (None: the global one), for `steps` optimizer steps
        (None: as many as client.local_epochs and client.max_local_steps give its data), of the LoRA `factors`
        its method trains this round (`ClientRule.trains`; the others keep their starting value) and the extra
        tensors, adding its method's `penalty` (if any) to each step's loss; SGD momentum starts fresh every round,
        as in the public code, seeded by (seed, round, client) so the result does not depend on where or when the
        client trains. The reported train loss is the task's, without the penalty. With a `local` adapter
        (`ClientRule.local`) the client first trains it alone for as many steps, mixed with the fixed shared pair,
        from the one `start` holds (`GlobalState.local`), and returns it with the summary of its training inputs in
        `local`. basis: layer -> A0, where A trains only as its core R of A = R A0 (`ClientRule.core`)."""
        seed = derive_seed("client", self.seed, round_index, client.id)
        torch.manual_seed(seed)
        self.load(start, rank)
        self.model.train()
        loader = make_loader(client.dataset, self.data_cfg.batch_size, shuffle=True, seed=seed,
                             num_workers=self.data_cfg.num_workers, device=self.fabric.device)
        total_steps = steps or local_steps(len(client.dataset), self.data_cfg.batch_size, self.client_cfg)
        # per-client bars only on a terminal: in a log file they would bury the round bar
        bar = tqdm(total=total_steps * (1 + (local is not None)), desc=f"round {round_index} client {client.id}",
                   leave=False, disable=not self.show_progress or not sys.stdout.isatty(), file=sys.stdout,
                   dynamic_ncols=True)
        if local is not None:
            self.model.train_local(True)
            self.model.mix_adapters(local.shared_weight, 1.0 - local.shared_weight)
            self._run_steps(loader, total_steps, round_index, bar.update)
            self.model.mix_adapters(1.0, 0.0)
            self.model.train_local(False)
        self.model.train_factors(factors)
        with self.model.core_only(basis):
            loss_sum, steps = self._run_steps(loader, total_steps, round_index, bar.update, penalty)
        bar.close()
        own = {} if local is None else self.local_state(client, local, seed)
        lora = self.model.get_lora()
        if faults.is_poisoned(round_index, client.id):  # in a factor it trained, which it uploads or keeps
            first = next(iter(lora))
            lora[first]["AB".index(factors[0])].view(-1)[0] = float("nan")
        update = ClientUpdate(weight=client.num_samples, lora=lora, extra=self.model.get_extra())
        self.model.set_rank(self.global_rank)
        return ClientResult(client=client.id, update=update, train_loss=loss_sum / steps if steps else float("nan"),
                            steps=steps, skipped_images=loader.skipped, local=own)

    def weight_gradient(self, client: Client, start: GlobalState, batches: int) -> dict[str, Tensor]:
        """The gradient of the loss at each adapted layer's frozen weight, for the model at `start`, averaged over
        the first `batches` batches of the client's data (fewer if it has fewer), in float64: the client's part of a
        start cut from the gradient (`Aggregator.starts_from_gradient`), seeded by (seed, client) alone."""
        seed = derive_seed("gradient", self.seed, client.id)
        torch.manual_seed(seed)
        self.load(start)
        self.model.train()
        loader = make_loader(client.dataset, self.data_cfg.batch_size, shuffle=True, seed=seed,
                             num_workers=self.data_cfg.num_workers, device=self.fabric.device)
        count = min(batches, len(loader))
        weights = self.model.frozen_weights()
        for weight in weights.values():
            weight.requires_grad_(True)
        try:
            for _, (inputs, targets) in zip(range(count), loader, strict=False):
                with self.fabric.autocast():
                    loss = self.model.training_step((inputs.to(self.fabric.device), targets.to(self.fabric.device)),
                                                    0)
                (loss / count).backward()
            return {name: weight.grad.double() for name, weight in weights.items()}
        finally:
            for parameter in self.model.parameters():
                parameter.grad = None
            for weight in weights.values():
                weight.requires_grad_(False)

    @torch.no_grad()
    def local_state(self, client: Client, local: LocalAdapter, seed: int) -> dict[str, Tensor]:
        """The client's local adapter and the mean of the normalised representations, under the local adapter
        alone, of `local.instances` of its training inputs drawn by `seed` (`LocalAdapter`), on the CPU."""
        loader = make_loader(client.dataset, local.instances, shuffle=True, seed=seed, num_workers=0,
                             device=self.fabric.device)
        inputs, _ = next(iter(loader))
        self.model.eval()
        with self.fabric.autocast():
            features = self.representations(inputs.to(self.fabric.device))
        self.model.train()
        summary = torch.nn.functional.normalize(features.float(), dim=-1).mean(0)
        own = {**pack_pairs(LOCAL, self.model.get_local_lora()), LOCAL_FEATURES: summary}
        return {key: tensor.detach().to("cpu", copy=True) for key, tensor in own.items()}

    def representations(self, inputs: Tensor) -> Tensor:
        """The model's representations of `inputs` under its local adapter alone (the shared pair left out)."""
        self.model.mix_adapters(0.0, 1.0)
        try:
            return self.model.representations(inputs)
        finally:
            self.model.mix_adapters(1.0, 0.0)

    def local_weights(self, inputs: Tensor, summary: Tensor, local: LocalAdapter) -> Tensor:
        """Per input, the weight of the local adapter: similarity_scale times the cosine of its representation to
        each of the client's training inputs', averaged (= the dot product of the normalised representation with
        `summary`, their normalised mean)."""
        features = torch.nn.functional.normalize(self.representations(inputs).float(), dim=-1)
        return local.similarity_scale * (features @ summary.to(features))

    def _run_steps(self, loader, total_steps: int, round_index: int, tick,
                   penalty: Penalty | None = None) -> tuple[float, int]:
        """`total_steps` optimizer steps over the loader's epochs; (sum of the losses, steps taken)."""
        optimizer = self.model.configure_optimizers()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        loss_sum, steps = torch.zeros((), device=self.fabric.device), 0
        for _ in range(math.ceil(total_steps / len(loader))):  # no loader is started for epochs past the cap
            for inputs, targets in loader:
                if steps == total_steps:
                    break
                with self.fabric.autocast():
                    loss = self.model.training_step((inputs.to(self.fabric.device), targets.to(self.fabric.device)),
                                                    steps)
                term = penalty(self.model.lora_parameters()) if penalty is not None else None
                optimizer.zero_grad(set_to_none=True)
                (loss if term is None else loss + term).backward()
                if self.client_cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, self.client_cfg.grad_clip)
                optimizer.step()
                loss_sum += loss.detach().float()
                steps += 1
                tick()
                if steps == 1:
                    faults.maybe_fail(round_index, "train")
        return loss_sum.item(), steps

    def evaluation_sums(self, state: GlobalState, test_sets: Sequence[Dataset], shard: tuple[int, int],
                        rank: int | None = None, local: LocalAdapter | None = None) -> tuple[Tensor, list[Tensor]]:
        """The model at `state` (as a client of LoRA `rank` sees it; None: the global model) on shard `shard[0]` of
        `shard[1]` contiguous shards of each test set, as tensors to be summed over the shards (float64): (correct,
        total, loss sum, loss terms) with one row per set (the loss columns stay 0 for a model that reports no eval
        loss), and per set a vector over all its items, 1 where the item is right, filled in on this shard's
        items only. A state with a local adapter that has trained (`GlobalState.local`, `local` its settings) is
        scored mixing it with the shared pair per input (`local_weights`)."""
        self.load(state, rank)
        self.model.eval()
        index, count = shard
        device = self.fabric.device
        sums = torch.zeros(len(test_sets), EVALUATION_SUMS, dtype=torch.float64, device=device)
        items = [torch.zeros(len(test), dtype=torch.float64, device=device) for test in test_sets]
        key = (tuple(map(id, test_sets)), index, count)
        if key not in self.eval_loaders:  # built once: the cached test sets stay open between evaluations
            self.eval_loaders[key] = evaluation_loaders(test_sets, index, count, self.data_cfg.eval_batch_size,
                                                        self.data_cfg.num_workers, device)
        with torch.inference_mode():
            for position, loader in enumerate(self.eval_loaders[key]):
                offset = index * len(test_sets[position]) // count  # the shard's first item
                for batch_index, (inputs, targets) in enumerate(loader):
                    with self.fabric.autocast():
                        if local is not None and LOCAL_FEATURES in state.local:
                            weight = self.local_weights(inputs.to(device), state.local[LOCAL_FEATURES], local)
                            self.model.mix_adapters(1.0 - weight, weight)
                        right, *loss = self.model.validation_step((inputs.to(device), targets.to(device)),
                                                                  batch_index)
                        if local is not None:
                            self.model.mix_adapters(1.0, 0.0)
                    items[position][offset:offset + len(right)] = right.to(torch.float64)
                    offset += len(right)
                    sums[position, :2] += torch.tensor([right.sum().item(), len(right)], dtype=torch.float64)
                    for column, value in enumerate(loss, start=2):
                        sums[position, column] += value
                if offset != (index + 1) * len(test_sets[position]) // count:  # skipped images: items unknown
                    items[position].fill_(float("nan"))
        self.model.on_validation_epoch_end()
        self.model.set_rank(self.global_rank)
        return sums, items
