"""What every aggregation method shares: the update types, input checks and the layer batches.

A method only implements `Aggregator.combine`, which sees one `LayerGroup`: all layers of one shape at the end of a
round, batched so that the math runs as batched matrix products over layers instead of Python loops (a method
whose inner problem has the same size for every shape may batch all groups at once in `combine_groups`). The
round itself is folded update by update (`streaming`); `needs` and `ideal_use` say what a method takes from it.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from lorafair.aggregation import cost, lowrank, ranks
from lorafair.aggregation.ideal import DenseIdeal, FactoredIdeal, Ideal

if TYPE_CHECKING:
    from lorafair.aggregation.streaming import RoundState

SUPPORTED_DTYPES = (torch.float32, torch.float64)


@dataclass
class ClientUpdate:
    """One client's result of a round. A is r x in and B is out x r (peft); weight is usually its example count.

    The rank is read from the shapes: the template's (the global rank R) or one rank r < R for all layers, trained
    with the scaling alpha / r (`ranks` states the convention)."""

    weight: float
    lora: dict[str, tuple[Tensor, Tensor]]
    extra: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class GlobalUpdate:
    """What the server sends back.

    lora: name -> (A, B) every client starts the next round from; None when clients re-initialise their LoRA.
    merge: name -> (A_m, B_m) whose product (times the LoRA scaling) every client adds to its frozen weight.
    extra: weighted average of the non-LoRA trainable tensors.
    metrics: floats for the logs (cosines to the ideal update summarised over layers, solve seconds, ...).
    bytes_up / bytes_down: bytes one client of the global rank sends / receives this round (LoRA factors and extra
    tensors).
    by_rank: rank r -> name -> (A, B) a rank-r client starts from, in its own scaling, for every rank below the
    global one that the round had or was asked for (empty when all clients have the global rank).
    bytes_by_rank: rank r -> (bytes up, bytes down) of a rank-r client, for the same ranks.
    """

    lora: dict[str, tuple[Tensor, Tensor]] | None
    merge: dict[str, tuple[Tensor, Tensor]] | None
    extra: dict[str, Tensor]
    metrics: dict[str, float]
    bytes_up: int
    bytes_down: int
    by_rank: dict[int, dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    bytes_by_rank: dict[int, tuple[int, int]] = field(default_factory=dict)

    def lora_for(self, rank: int) -> dict[str, tuple[Tensor, Tensor]] | None:
        """The pairs a client of `rank` starts from (None when clients re-initialise their LoRA)."""
        return self.by_rank.get(rank, self.lora) if self.lora is not None else None

    def bytes_for(self, rank: int) -> tuple[int, int]:
        """(bytes up, bytes down) of a client of `rank`."""
        return self.bytes_by_rank.get(rank, (self.bytes_up, self.bytes_down))


@dataclass
class LayerGroup:
    """All LoRA layers of one shape at the end of a round, batched over its L layers: the averages
    A_bar [L, r, in] and B_bar [L, out, r], and the ideal update dW_l = sum_k p_k B_k A_k on the group's path.

    Methods that need every client's factors (`Aggregator.needs == "factors"`) also get them: A [L, K, r, in],
    B [L, out, K, r] and the normalised weights p_k; `dense` then says whether the metrics should form dW.
    Clients of lower ranks arrive padded to the group's rank (`ranks.to_server`): client_ranks [K] holds each
    kept client's own rank, and lower_ranks the ranks below the group's that clients restart from. A group made by
    `truncated(r)` has kept_rank = r: its averages are zero beyond their leading r components.
    """

    names: list[str]
    A_bar: Tensor
    B_bar: Tensor
    ideal: Ideal | None = None
    A: Tensor | None = None
    B: Tensor | None = None
    weights: Tensor | None = None
    dense: bool = False
    client_ranks: Tensor | None = None
    lower_ranks: tuple[int, ...] = ()
    kept_rank: int | None = None

    def __post_init__(self) -> None:
        if self.ideal is None:
            self.ideal = DenseIdeal(self.B_stack @ self.A_stack) if self.dense else FactoredIdeal(self.B_stack,
                                                                                                self.A_stack)

    @property
    def rank(self) -> int:
        return self.A_bar.shape[-2]

    @property
    def A_stack(self) -> Tensor:
        """[L, K r, in]: the rows A_1; ...; A_K."""
        layers, clients, rank, fan_in = self.A.shape
        return self.A.view(layers, clients * rank, fan_in)

    @cached_property
    def B_stack(self) -> Tensor:
        """[L, out, K r]: the columns p_1 B_1 ... p_K B_K."""
        layers, fan_out, clients, rank = self.B.shape
        return (self.B * self.weights.view(1, 1, -1, 1)).view(layers, fan_out, clients * rank)

    def cosine_to_ideal(self, B: Tensor, A: Tensor) -> Tensor:
        """cos(dW, B @ A) per layer, on the group's path, without forming B @ A."""
        return lowrank.cosine_from_parts(self.ideal.inner(B, A), lowrank.norm_sq(B, A), self.ideal.norm_sq)

    def own_components(self) -> Tensor | None:
        """Indices, among the K r stacked components, of those within each client's own rank (the rest are the
        zero padding of lower-rank clients); None when every client has the group's rank."""
        if self.client_ranks is None or bool((self.client_ranks == self.rank).all()):
            return None
        within = torch.arange(self.rank, device=self.client_ranks.device) < self.client_ranks[:, None]
        return within.view(-1).nonzero().view(-1).to(self.A_bar.device)

    def truncated(self, rank: int) -> LayerGroup:
        """The same round with the averages cut to their leading `rank` components (zero beyond, same shapes)."""
        A_bar, B_bar = ranks.leading((self.A_bar, self.B_bar), rank)
        return replace(self, A_bar=A_bar, B_bar=B_bar, lower_ranks=(), kept_rank=rank)


@dataclass
class GroupResult:
    """A method's answer for one LayerGroup, batched over its layers; metrics hold one value per layer."""

    lora: tuple[Tensor, Tensor] | None = None
    merge: tuple[Tensor, Tensor] | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)
    by_rank: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Lower rank r -> the pair (at the group's rank and scaling) whose leading r components a rank-r client takes;
    by default `lora` itself."""


class Aggregator:
    """Base of every method: checks the updates, folds them into a round (`start`, `RoundState.add`, `finish`),
    calls `combine` per layer group and assembles the GlobalUpdate. `aggregate` is that loop for a whole list."""

    name: ClassVar[str]
    """The method's name in configs and on the command line."""
    display_name: ClassVar[str]
    """How the paper writes it, for tables and plots."""
    sends_A: ClassVar[bool] = True
    """False when A stays frozen on the clients and never travels (FFA-LoRA)."""
    needs: ClassVar[str] = "ideal"
    """What the method takes from a round: "averages" (weighted sums of A and B), "ideal" (those and the ideal
    update sum p_k B_k A_k, factored or dense), or "factors" (every client's factors, which it sends on)."""

    def combine(self, group: LayerGroup) -> GroupResult:
        raise NotImplementedError

    def combine_groups(self, groups: list[LayerGroup]) -> list[GroupResult]:
        """`combine` for every group; a method overrides it to solve all groups in one batch."""
        return [self.combine(group) for group in groups]

    def ideal_use(self) -> cost.IdealUse:
        """What `combine` asks of the ideal update, for the cost model (the cos_avg metric is counted apart)."""
        return cost.IdealUse()

    def path_for(self, clients: int, rank: int, fan_out: int, fan_in: int) -> str:
        """The path ('factored' or 'dense') the cost model picks for a layer group of this shape."""
        return cost.cheaper_path(self.ideal_use(), clients, rank, fan_out, fan_in)

    def check_update(self, index: int, update: ClientUpdate, first: ClientUpdate) -> str | None:
        """Why the round cannot be aggregated with `update` next to `first` (its template); raised by `finish`,
        after every update's own checks. None: it can."""
        return None

    def start(self, like: ClientUpdate, clients: int, path: str | None = None,
              lower_ranks: Sequence[int] = ()) -> RoundState:
        """A round expecting `clients` updates shaped like `like` (names, shapes, dtype and device of its LoRA
        layers and extra tensors; called client 0 in messages; its ranks are the global ones). path forces
        'factored' or 'dense' for every layer group instead of the cost model's choice (for tests and benchmarks).
        lower_ranks: ranks below the global one to return starting pairs for, besides those the round brings."""
        from lorafair.aggregation.streaming import RoundState

        return RoundState(self, like, clients, path, lower_ranks)

    def aggregate(self, updates: Sequence[ClientUpdate], like: ClientUpdate | None = None,
                  lower_ranks: Sequence[int] = ()) -> GlobalUpdate:
        """All updates of a round at once: `start`, `add` each, `finish`. The weights are normalised first (in
        float64), so any finite weights work whatever the factors' dtype. like: the template (default: the update
        of the largest rank)."""
        total = check_weights(updates)
        check_round_shapes(updates)
        if like is None:
            template = max(range(len(updates)), key=lambda k: next(iter(updates[k].lora.values()))[0].shape[0])
            bad = find_bad_updates([updates[template]])
            if bad:  # the template's own checks would name it client 0
                raise ValueError(f"client {template}: {bad[0]}; drop this client (find_bad_updates lists them)")
            like = updates[template]
        state = self.start(like, clients=len(updates), lower_ranks=lower_ranks)
        for update in updates:
            state.add(replace(update, weight=float(update.weight) / total))
        return state.finish()

    def global_update(self, like: ClientUpdate, groups: list[LayerGroup], extra: dict[str, Tensor],
                      seconds: float) -> GlobalUpdate:
        """`combine` every group and assemble the GlobalUpdate; seconds: time already spent on the round."""
        start = time.perf_counter()
        results = self._combine_checked(groups)
        order = list(like.lora)
        lora = _by_layer(order, groups, [result.lora for result in results])
        merge = _by_layer(order, groups, [result.merge for result in results])
        metrics = _summarise([result.metrics for result in results])
        metrics["solve_seconds"] = seconds + time.perf_counter() - start
        extra_bytes = _nbytes(extra.values())
        merge_bytes = sum(_nbytes(pair) for pair in (merge or {}).values()) + extra_bytes
        by_rank = {} if lora is None else {
            rank: _by_layer(order, groups, [ranks.to_client(result.by_rank[rank], rank) for result in results])
            for rank in groups[0].lower_ranks}
        up = {rank: self._lora_bytes(ranks.to_client(pair, rank) for pair in like.lora.values()) + extra_bytes
              for rank in groups[0].lower_ranks}
        return GlobalUpdate(lora=lora, merge=merge, extra=extra, metrics=metrics,
                            bytes_up=self._lora_bytes(like.lora.values()) + extra_bytes,
                            bytes_down=self._lora_bytes((lora or {}).values()) + merge_bytes, by_rank=by_rank,
                            bytes_by_rank={rank: (up[rank], self._lora_bytes(by_rank.get(rank, {}).values())
                                                  + merge_bytes) for rank in up})

    def _combine_checked(self, groups: list[LayerGroup]) -> list[GroupResult]:
        """`combine_groups`, plus the averaging bias every method logs. Finite inputs can still overflow (float32
        with huge entries): that becomes a ValueError naming the layer instead of NaN in the result."""
        advice = f"the factors are too large for {groups[0].A_bar.dtype} (aggregate in float64 or check the clients)"
        try:
            results = self.combine_groups(groups)
        except torch.linalg.LinAlgError as error:
            names = [name for group in groups for name in group.names]
            raise ValueError(f"{self.name}: linear algebra failed on layers {names} ({error}); "
                             f"with finite inputs this means {advice}") from error
        for group, result in zip(groups, results, strict=True):
            result.metrics = {"cos_avg": group.cosine_to_ideal(group.B_bar, group.A_bar), **result.metrics}
            if result.lora is not None:
                result.by_rank = {rank: result.by_rank.get(rank, result.lora) for rank in group.lower_ranks}
            for rank, pair in result.by_rank.items():  # how close each rank's starting pair points to dW
                result.metrics[f"cos_rank{rank}"] = group.cosine_to_ideal(*reversed(ranks.leading(pair, rank)))
            lower = [factor for pair in result.by_rank.values() for factor in pair]
            for batched in (*(result.lora or ()), *(result.merge or ()), *lower, *result.metrics.values()):
                finite = torch.isfinite(batched).reshape(len(group.names), -1).all(-1)
                if not bool(finite.all()):
                    layer = group.names[int((~finite).nonzero()[0])]
                    raise ValueError(f"{self.name}: layer '{layer}' overflowed to NaN/Inf although every input was "
                                     f"finite: {advice}")
        return results

    def _lora_bytes(self, pairs) -> int:
        return sum(_nbytes(pair if self.sends_A else pair[1:]) for pair in pairs)


def find_bad_updates(updates: Sequence[ClientUpdate]) -> dict[int, str]:
    """Client index -> why its update cannot be used (NaN or Inf anywhere), so a caller can drop those clients."""
    bad = {}
    for index, update in enumerate(updates):
        if not is_finite_number(update.weight):
            bad[index] = f"weight is {update.weight}"
            continue
        tensors = [(f"layer '{name}' {factor}", tensor) for name, pair in update.lora.items()
                   if isinstance(pair, tuple | list) for factor, tensor in zip("AB", pair, strict=False)]
        tensors += [(f"extra tensor '{name}'", tensor) for name, tensor in update.extra.items()]
        for where, tensor in tensors:
            if isinstance(tensor, Tensor) and not bool(torch.isfinite(tensor).all()):
                bad[index] = f"NaN or Inf in {where}"
                break
    return bad


def check_weights(updates: Sequence[ClientUpdate]) -> float:
    """The weights' sum, after refusing an empty round and weights that are negative, NaN or all zero."""
    if len(updates) == 0:
        raise ValueError("aggregate() needs at least one ClientUpdate, got an empty list")
    for index, update in enumerate(updates):
        if not is_finite_number(update.weight) or update.weight < 0:
            raise ValueError(f"client {index}: weight must be a finite number >= 0 (its example count), "
                             f"got {update.weight!r}")
    total = math.fsum(float(update.weight) for update in updates)
    if total <= 0:
        raise ValueError(f"the client weights sum to {total}: give at least one client a positive weight "
                         "(its number of training examples)")
    return total


def check_round_shapes(updates: Sequence[ClientUpdate]) -> None:
    """Checks that need the whole round: every client has client 0's layer names and pairs. Each update's own
    checks (shapes against the template's, one rank per client) run as it is added."""
    first = updates[0].lora
    if not isinstance(first, dict) or not first:
        raise ValueError("client 0: lora must be a non-empty dict of layer name -> (A, B)")
    for index, update in enumerate(updates):
        check_same_names(index, "LoRA layers", update.lora, first)
    for index, update in enumerate(updates):
        for name in first:
            check_pair(index, name, update.lora[name])


def check_extra(index: int, name: str, tensor: object, reference: Tensor) -> None:
    """One extra tensor against client 0's: a finite floating-point tensor of the same shape, dtype and device."""
    where = f"client {index}, extra tensor '{name}'"
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        raise ValueError(f"{where}: must be a floating-point tensor, got {_describe(tensor)}")
    if (tensor.shape, tensor.dtype, tensor.device) != (reference.shape, reference.dtype, reference.device):
        raise ValueError(f"{where}: {_describe(tensor)} differs from client 0's {_describe(reference)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{where}: has NaN or Inf; drop this client (find_bad_updates lists them)")


def check_same_names(index: int, what: str, names: dict, reference: dict) -> None:
    if not isinstance(names, dict):
        raise ValueError(f"client {index}: {what} must be a dict, got {type(names).__name__}")
    if names.keys() != reference.keys():
        missing = sorted(reference.keys() - names.keys())
        unexpected = sorted(names.keys() - reference.keys())
        raise ValueError(f"client {index}: {what} differ from client 0's: missing {missing}, unexpected {unexpected}")


def check_pair(index: int, name: str, pair: object) -> None:
    where = f"client {index}, layer '{name}'"
    if not (isinstance(pair, tuple | list) and len(pair) == 2):
        raise ValueError(f"{where}: expected a pair (A, B), got {type(pair).__name__}")
    for factor, tensor in zip("AB", pair, strict=True):
        if not isinstance(tensor, Tensor) or tensor.dim() != 2 or tensor.numel() == 0:
            raise ValueError(f"{where}: {factor} must be a non-empty 2-D tensor, got {_describe(tensor)}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{where}: {factor} is {tensor.dtype}; LoRA factors must be float32 or float64 "
                             "(cast them with .float() before aggregating)")


def check_factors(index: int, name: str, pair: tuple[Tensor, Tensor], first_pair: tuple[Tensor, Tensor],
                  reference: Tensor) -> None:
    """Shapes against client 0's same layer (the rank may be lower); dtype and device against client 0's first
    layer."""
    where = f"client {index}, layer '{name}'"
    A, B = pair
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"{where}: A is r x in = {tuple(A.shape)} and B is out x r = {tuple(B.shape)}; "
                         "their ranks differ")
    global_rank, fan_in, fan_out = first_pair[0].shape[0], first_pair[0].shape[1], first_pair[1].shape[0]
    if (A.shape[1], B.shape[0]) != (fan_in, fan_out) or A.shape[0] > global_rank:
        raise ValueError(f"{where}: A, B have shapes {tuple(A.shape)}, {tuple(B.shape)} but the round's template "
                         f"(client 0) has rank {global_rank}, in {fan_in}, out {fan_out}; a client may have a lower "
                         "rank, never another layer size or a higher rank")
    for factor, tensor in (("A", A), ("B", B)):
        if (tensor.dtype, tensor.device) != (reference.dtype, reference.device):
            raise ValueError(f"{where}: {factor} is {tensor.dtype} on {tensor.device} but client 0's first layer is "
                             f"{reference.dtype} on {reference.device}; all factors must share one dtype and device")


def client_rank(index: int, update: ClientUpdate, like: ClientUpdate) -> int | None:
    """None when `update` has the template's ranks, else its one rank r, below every layer's global rank."""
    own = {name: pair[0].shape[0] for name, pair in update.lora.items()}
    if all(own[name] == pair[0].shape[0] for name, pair in like.lora.items()):
        return None
    lowest = min(pair[0].shape[0] for pair in like.lora.values())
    if len(set(own.values())) > 1 or next(iter(own.values())) >= lowest:
        raise ValueError(f"client {index}: LoRA ranks {sorted(set(own.values()))} differ from the template's; a "
                         f"client of a lower rank has one rank r < {lowest} for all its layers")
    return next(iter(own.values()))


def _by_layer(order: list[str], groups: list[LayerGroup],
              batched: list[tuple[Tensor, Tensor] | None]) -> dict[str, tuple[Tensor, Tensor]] | None:
    """Split each group's batched pair back into name -> (A, B), in the clients' layer order; None if none."""
    found = {}
    for group, pair in zip(groups, batched, strict=True):
        if pair is not None:
            found.update({name: (pair[0][i], pair[1][i]) for i, name in enumerate(group.names)})
    return {name: found[name] for name in order if name in found} or None


def _summarise(per_group: list[dict[str, Tensor]]) -> dict[str, float]:
    """Per-layer metric values of all groups -> their mean and minimum over layers."""
    metrics = {}
    for key in per_group[0]:
        values = torch.cat([metrics_of_group[key] for metrics_of_group in per_group])
        metrics[f"{key}_mean"] = values.mean().item()
        metrics[f"{key}_min"] = values.min().item()
    return metrics


def is_finite_number(value: object) -> bool:
    """A finite real number (bool excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _nbytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return type(value).__name__


class OptionError(ValueError):
    """A method's option has an impossible value; `option` names it and `problem` says what is valid."""

    def __init__(self, method: str, option: str, problem: str) -> None:
        super().__init__(f"{method}: option {option} {problem}")
        self.option, self.problem = option, problem


def check_option(method: str, option: str, value: object, valid: bool, expected: str) -> None:
    """Refuse a bad option value with a message naming the method, the option and what is valid."""
    if not valid:
        raise OptionError(method, option, f"must be {expected}, got {value!r}")


def is_count(value: object) -> bool:
    """An integer >= 0 (bool excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
