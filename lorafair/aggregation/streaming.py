"""A round folded as its updates arrive: `Aggregator.start`, then `RoundState.add` per client, then `finish`.

    state = build_aggregator("lorafair").start(like=first_update, clients=K)
    for update in arriving_updates:         # e.g. a Flower strategy, as each message comes in
        state.add(update)                    # checks it, folds it in, keeps no reference to it
    out = state.finish()                     # the same GlobalUpdate as aggregate(all updates)

What a round keeps is what its method declares (`Aggregator.needs`), of the factors its clients upload this round
(`ClientRule.sends`; a factor they do not upload is the template's in the answer):
- "averages" (FFA-LoRA, FedSA-LoRA, RoLoRA, FedSVD, Fed-SB): the weight sum and the weighted sums of A and of B; B_bar
  A_bar is then the ideal update itself (one factor is shared, or the server never sees the product).
- "ideal" (FedIT, FlexLoRA, LoRA-FAIR, FLoRA-NA, FRLoRA, FedDPA): those, plus the ideal update per layer group, on the
  path the cost model picks for K clients: factored (each client's factors in its slot; fewer numbers than a dense dW
  below the crossover) or dense (sum w_k B_k A_k, out x in whatever K; factors wait in a small chunk and are folded in
  one batched product).
- "factors" (FLoRA, FedEx-LoRA, HetLoRA): every client's factors in its slot, because the download carries them all
  (HetLoRA: because its weights are each client's own norm).

Every tensor of `accumulators()` is a sum over clients (a client's slot is zero in every other state). Two states
that folded disjoint clients into disjoint slots therefore add up, tensor by tensor, to the state that folded them
all: an all_reduce(SUM) of each accumulator across ranks, then `finish` on any rank.

A client of a lower rank is folded as the rank-R pair that means the same update (`ranks.to_server`); the round
counts the clients of each lower rank, and the groups that keep factors note each client's own rank.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from lorafair.aggregation import cost, ranks
from lorafair.aggregation.ideal import DenseIdeal, FactoredIdeal
from lorafair.aggregation.rules import FACTORS, ClientRule
from lorafair.aggregation.updates import (
    ClientUpdate,
    GlobalUpdate,
    LayerGroup,
    check_extra,
    check_factors,
    check_pair,
    check_same_names,
    client_rank,
    is_finite_number,
)

WEIGHT_DTYPE = torch.float64
"""Client weights (example counts) are summed in float64 whatever the factors' dtype."""


class Method(Protocol):
    """What a round asks of its method (an `Aggregator`, which starts the round)."""

    needs: str

    def client_rule(self, round_index: int) -> ClientRule: ...
    def downloads(self, round_index: int) -> str: ...
    def path_for(self, clients: int, rank: int, fan_out: int, fan_in: int) -> str: ...
    def refusal(self, index: int, update: ClientUpdate, first: ClientUpdate, rule: ClientRule) -> str | None: ...
    def global_update(self, like: ClientUpdate, groups: list[LayerGroup], extra: dict[str, Tensor],
                      seconds: float, sends: str = FACTORS, downloads: str | None = None,
                      core: bool = False) -> GlobalUpdate: ...


class GroupState:
    """The accumulators of the layers of one shape: A_sum [L, r, in] and B_sum [L, out, r] of the uploaded factors
    (a factor that is not uploaded is the template's, `fixed_A` / `fixed_B`, of the template's pairs `template`); slots
    A_slots [L, C, r, in] and B_slots [L, out, C, r] for one client each (the round's K clients, or a chunk
    on the dense path), with slot_ranks [C] (each client's own rank) where every client keeps its slot; dW_sum
    [L, out, in] on the dense path of a method that needs the ideal update."""

    def __init__(self, names: list[str], like: ClientUpdate, needs: str, path: str, clients: int,
                 sends: str = FACTORS) -> None:
        A, B = like.lora[names[0]]
        (rank, fan_in), fan_out, layers = A.shape, B.shape[0], len(names)
        self.names, self.path, self.rank = names, path, rank
        # a factor the clients do not upload (frozen, as FFA-LoRA's A, or kept, as FedSA-LoRA's B) is the
        # template's, exactly: nothing to sum
        self.template = (torch.stack([like.lora[name][0] for name in names]),
                         torch.stack([like.lora[name][1] for name in names]))
        self.fixed_A = None if "A" in sends else self.template[0]
        self.fixed_B = None if "B" in sends else self.template[1]
        self.A_sum = A.new_zeros(layers, rank, fan_in) if "A" in sends else None
        self.B_sum = B.new_zeros(layers, fan_out, rank) if "B" in sends else None
        self.folds_dense = needs == "ideal" and path == "dense"
        self.dW_sum = B.new_zeros(layers, fan_out, fan_in) if self.folds_dense else None
        self.keeps_clients = needs == "factors" or (needs == "ideal" and path == "factored")
        capacity = clients if self.keeps_clients else cost.chunk_clients(rank, fan_out, fan_in)
        has_slots = self.keeps_clients or self.folds_dense
        self.A_slots = A.new_zeros(layers, capacity, rank, fan_in) if has_slots else None
        self.B_slots = B.new_zeros(layers, fan_out, capacity, rank) if has_slots else None
        self.chunk_weights = torch.zeros(capacity, dtype=A.dtype, device=A.device) if self.folds_dense else None
        self.chunk_filled = 0
        self.slot_ranks = torch.zeros(capacity, dtype=WEIGHT_DTYPE, device=A.device) if self.keeps_clients else None

    def fold(self, update: ClientUpdate, slot: int, weight: float, rank: int | None) -> None:
        """Fold one update padded to the group's rank; rank: the client's own (None: the group's)."""
        position = slot if self.keeps_clients else self.chunk_filled
        if self.slot_ranks is not None:
            self.slot_ranks[slot] = rank or self.rank
        for layer, name in enumerate(self.names):
            A, B = update.lora[name]
            if self.A_sum is not None:
                self.A_sum[layer].add_(A, alpha=weight)
            if self.B_sum is not None:
                self.B_sum[layer].add_(B, alpha=weight)
            if self.A_slots is not None:
                self.A_slots[layer, position].copy_(A)
                self.B_slots[layer, :, position].copy_(B)
        if self.folds_dense:
            self.chunk_weights[position] = weight
            self.chunk_filled += 1
            if self.chunk_filled == len(self.chunk_weights):
                self.flush()

    def flush(self) -> None:
        """Fold the waiting chunk into dW_sum with one batched product: sum_k (w_k B_k) A_k."""
        filled = self.chunk_filled
        if filled == 0:
            return
        layers, fan_out, _, rank = self.B_slots.shape
        weighted_B = self.B_slots[:, :, :filled] * self.chunk_weights[:filled].view(1, 1, -1, 1)
        self.dW_sum.baddbmm_(weighted_B.reshape(layers, fan_out, filled * rank),
                             self.A_slots[:, :filled].reshape(layers, filled * rank, -1))
        self.chunk_filled = 0

    def accumulators(self) -> list[Tensor]:
        self.flush()
        slots = [self.A_slots, self.B_slots, self.slot_ranks] if self.keeps_clients else []
        sums = [total for total in (self.A_sum, self.B_sum) if total is not None]
        return [*sums, *slots, *([self.dW_sum] if self.folds_dense else [])]

    def layer_group(self, weight_sum: Tensor, slot_weights: Tensor | None, filled: Tensor | None,
                    lower_ranks: tuple[int, ...], round_index: int = 1) -> LayerGroup:
        """What the method sees at finish: averages, the ideal update on this group's path, and the clients'
        factors (only those of filled slots) where they were kept, in round `round_index`."""
        self.flush()
        dtype = (self.fixed_B if self.B_sum is None else self.B_sum).dtype
        total = weight_sum.to(dtype)
        A_bar = self.fixed_A if self.A_sum is None else self.A_sum / total
        B_bar = self.fixed_B if self.B_sum is None else self.B_sum / total
        if not self.keeps_clients:
            ideal = DenseIdeal(self.dW_sum / total) if self.folds_dense else FactoredIdeal(B_bar, A_bar)
            return LayerGroup(names=self.names, A_bar=A_bar, B_bar=B_bar, ideal=ideal, lower_ranks=lower_ranks,
                              round_index=round_index, template=self.template)
        kept = filled.nonzero().view(-1)
        A, B = self.A_slots, self.B_slots
        if len(kept) < len(filled):
            A, B = A[:, kept], B[:, :, kept]
        weights = (slot_weights[kept] / weight_sum).to(A.dtype)
        return LayerGroup(names=self.names, A_bar=A_bar, B_bar=B_bar, A=A, B=B, weights=weights,
                          dense=self.path == "dense", client_ranks=self.slot_ranks[kept].long(),
                          lower_ranks=lower_ranks, round_index=round_index, template=self.template)


class RoundState:
    """One round on the server between `Aggregator.start` and `finish`; see the module docstring."""

    def __init__(self, aggregator: Method, like: ClientUpdate, clients: int, path: str | None = None,
                 lower_ranks: Sequence[int] = (), round_index: int = 1) -> None:
        started = time.perf_counter()
        if not (isinstance(clients, int) and clients >= 1):
            raise ValueError(f"start() needs clients >= 1 (the number of updates the round expects), got {clients!r}")
        if path not in (None, *cost.PATHS):
            raise ValueError(f"start(): path must be None (the cost model decides) or one of {cost.PATHS}, "
                             f"got {path!r}")
        self.aggregator, self.like, self.clients, self.round_index = aggregator, like, clients, round_index
        self.rule = aggregator.client_rule(round_index)
        """What the round's clients train, upload and keep."""
        shapes = _shapes_of(like)
        reference = like.lora[next(iter(like.lora))][0]
        self.weight_sum = torch.zeros((), dtype=WEIGHT_DTYPE, device=reference.device)
        self.count = torch.zeros((), dtype=WEIGHT_DTYPE, device=reference.device)
        needs = aggregator.needs
        self.groups = [GroupState(names, like, needs, "factored" if needs == "averages" else
                                  path or aggregator.path_for(clients, *shape), clients, self.rule.sends)
                       for shape, names in shapes.items()]
        # Only where some group keeps every client's factors: each slot's weight, and which slots are filled.
        keeps_clients = any(group.keeps_clients for group in self.groups)
        self.slot_weights = torch.zeros(clients, dtype=WEIGHT_DTYPE, device=reference.device) if keeps_clients \
            else None
        self.filled = torch.zeros_like(self.slot_weights) if keeps_clients else None
        self.extra_sums = {name: torch.zeros_like(tensor) for name, tensor in like.extra.items()}
        lowest = min(A.shape[0] for A, _ in like.lora.values())
        # rank_counts[r]: clients of rank r < lowest global rank in this round (a sum, like every accumulator)
        self.rank_counts = torch.zeros(lowest, dtype=WEIGHT_DTYPE, device=reference.device)
        self.lower_ranks = _check_lower_ranks(lower_ranks, lowest)
        self.refusal: str | None = None
        self.seconds = time.perf_counter() - started

    @property
    def paths(self) -> dict[str, str]:
        """Layer name -> the path its group runs on ('factored' or 'dense')."""
        return {name: group.path for group in self.groups for name in group.names}

    def add(self, update: ClientUpdate, slot: int | None = None) -> None:
        """Check `update` and fold it in; a refused update (ValueError) leaves the state as it was.

        slot: the client's index in the round, 0 <= slot < clients (default: the next one). Ranks that fold
        different clients of one round give each its index in the round, so their accumulators add up."""
        started = time.perf_counter()
        slot = int(self.count.item()) if slot is None else slot
        rank = self._check(update, slot)
        weight = float(update.weight)
        self.weight_sum += weight
        self.count += 1
        if self.filled is not None:
            self.slot_weights[slot] = weight
            self.filled[slot] = 1
        if self.refusal is None:
            self.refusal = self.aggregator.refusal(slot, update, self.like, self.rule)
        if rank is not None:
            self.rank_counts[rank] += 1
            update = ClientUpdate(update.weight, {name: ranks.to_server(pair, self.like.lora[name][0].shape[0])
                                                  for name, pair in update.lora.items()}, update.extra)
        for group in self.groups:
            group.fold(update, slot, weight, rank)
        for name, tensor in update.extra.items():
            self.extra_sums[name].add_(tensor, alpha=weight)
        self.seconds += time.perf_counter() - started

    def accumulators(self) -> list[Tensor]:
        """Every tensor the round has folded, each a sum over clients: sum them across ranks (in place, in this
        order; the order and shapes are the same in every state started alike), then `finish`. Their shapes do
        not depend on the number of clients, except the slots of groups that keep every client's factors."""
        tensors = [self.weight_sum, self.count, self.rank_counts,
                   *([self.slot_weights, self.filled] if self.filled is not None else [])]
        for group in self.groups:
            tensors += group.accumulators()
        return tensors + list(self.extra_sums.values())

    def finish(self) -> GlobalUpdate:
        """The round's GlobalUpdate, from the accumulators alone."""
        started = time.perf_counter()
        if self.count.item() == 0:
            raise ValueError("finish() needs at least one added ClientUpdate, got none")
        total = self.weight_sum.item()
        if total <= 0:
            raise ValueError(f"the client weights sum to {total}: give at least one client a positive weight "
                             "(its number of training examples)")
        if self.refusal is not None:
            raise ValueError(self.refusal)
        present = {int(rank) for rank in self.rank_counts.nonzero().view(-1)}
        lower = tuple(sorted(present | set(self.lower_ranks)))
        groups = [group.layer_group(self.weight_sum, self.slot_weights, self.filled, lower, self.round_index)
                  for group in self.groups]
        extra = {name: tensor / torch.tensor(total, dtype=tensor.dtype, device=tensor.device)
                 for name, tensor in self.extra_sums.items()}
        return self.aggregator.global_update(self.like, groups, extra,
                                             self.seconds + time.perf_counter() - started, self.rule.sends,
                                             self.aggregator.downloads(self.round_index), self.rule.core)

    def _check(self, update: ClientUpdate, slot: int) -> int | None:
        """Refuse a bad update; its own rank when below the template's, else None."""
        if not (isinstance(slot, int) and 0 <= slot < self.clients):
            raise ValueError(f"add(): slot must be an integer in [0, {self.clients}) (the round was started for "
                             f"{self.clients} clients), got {slot!r}")
        if self.filled is not None and bool(self.filled[slot]):
            raise ValueError(f"add(): slot {slot} already holds a client of this round")
        if not is_finite_number(update.weight) or update.weight < 0:
            raise ValueError(f"client {slot}: weight must be a finite number >= 0 (its example count), "
                             f"got {update.weight!r}")
        check_same_names(slot, "LoRA layers", update.lora, self.like.lora)
        reference = next(iter(self.like.lora.values()))[0]
        for name, first_pair in self.like.lora.items():
            check_pair(slot, name, update.lora[name])
            check_factors(slot, name, update.lora[name], first_pair, reference)
        for name, pair in update.lora.items():
            for factor, tensor in zip("AB", pair, strict=True):
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"client {slot}: NaN or Inf in layer '{name}' {factor}; drop this client "
                                     "(find_bad_updates lists them) or fix its training")
        check_same_names(slot, "extra tensors", update.extra, self.like.extra)
        for name, tensor in update.extra.items():
            check_extra(slot, name, tensor, self.like.extra[name])
        return client_rank(slot, update, self.like)


def _check_lower_ranks(lower_ranks: Sequence[int], lowest: int) -> tuple[int, ...]:
    for rank in lower_ranks:
        if not (isinstance(rank, int) and 1 <= rank < lowest):
            raise ValueError(f"start(): lower_ranks must be integers in [1, {lowest}) (below the template's rank), "
                             f"got {rank!r}")
    return tuple(lower_ranks)


def _shapes_of(like: ClientUpdate) -> dict[tuple[int, int, int], list[str]]:
    """(rank, out, in) -> names of the template's layers of that shape, after checking the template itself."""
    if not isinstance(like.lora, dict) or not like.lora:
        raise ValueError("client 0: lora must be a non-empty dict of layer name -> (A, B)")
    reference = None
    shapes: dict[tuple[int, int, int], list[str]] = {}
    for name, pair in like.lora.items():
        check_pair(0, name, pair)
        reference = pair[0] if reference is None else reference
        check_factors(0, name, pair, pair, reference)
        A, B = pair
        shapes.setdefault((A.shape[0], B.shape[0], A.shape[1]), []).append(name)
    check_same_names(0, "extra tensors", like.extra, like.extra)
    for name, tensor in like.extra.items():
        check_extra(0, name, tensor, tensor)
    return shapes
