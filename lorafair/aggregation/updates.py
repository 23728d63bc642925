"""What a round takes in and gives out, and the checks every update passes.

`ClientUpdate` is one client's result, `GlobalUpdate` the server's answer; a method's `combine` sees one
`LayerGroup` (all layers of one shape, batched) and answers with a `GroupResult`. The checks refuse an update with a
message naming the client, the layer and what is wrong, before any of it is folded into a round.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import Tensor

from lorafair.aggregation import lowrank, ranks
from lorafair.aggregation.ideal import DenseIdeal, FactoredIdeal, Ideal

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
    round_index: int = 1
    """The round (1, 2, ...) whose updates the group holds, for a method whose rule changes from round to round."""
    template: tuple[Tensor, Tensor] | None = None
    """The round's template pairs, A [L, r, in] and B [L, out, r]: what the round's clients started from."""

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

    def client_stacks(self, weighted: str) -> tuple[Tensor, Tensor]:
        """(A_stack [L, n, in], B_stack [L, out, n]): every client's factors side by side, the weights p_k on the
        `weighted` factor ("A" or "B"), without the zero padding of lower-rank clients (`own_components`), so that
        B_stack @ A_stack is the ideal update."""
        if weighted == "B":
            A_stack, B_stack = self.A_stack, self.B_stack
        else:
            layers, clients, rank, fan_in = self.A.shape
            A_stack = (self.A * self.weights.view(1, -1, 1, 1)).reshape(layers, clients * rank, fan_in)
            B_stack = self.B.reshape(layers, -1, clients * rank)
        own = self.own_components()
        if own is not None:
            A_stack, B_stack = A_stack[:, own], B_stack[:, :, own]
        return A_stack, B_stack

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


def is_finite_number(value: object) -> bool:
    """A finite real number (bool excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return type(value).__name__
