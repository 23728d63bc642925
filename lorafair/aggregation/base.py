"""What every aggregation method shares: the `Aggregator` base class, which checks the updates, folds them into a
round and assembles the answer.

A method only implements `Aggregator.combine`, which sees one `LayerGroup` (`updates`): all layers of one shape at
the end of a round, batched so that the math runs as batched matrix products over layers instead of Python loops (a
method whose inner problem has the same size for every shape may batch all groups at once in `combine_groups`). The
round itself is folded update by update (`streaming`); `needs` and `ideal_use` say what a method takes from it, and
`client_rule` what its clients train, upload and keep (`rules`).
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor

from lorafair.aggregation import cost, ranks
from lorafair.aggregation.rules import FACTORS, ClientRule
from lorafair.aggregation.streaming import RoundState
from lorafair.aggregation.updates import (
    ClientUpdate,
    GlobalUpdate,
    GroupResult,
    LayerGroup,
    check_round_shapes,
    check_weights,
    find_bad_updates,
)


class Aggregator:
    """Base of every method: checks the updates, folds them into a round (`start`, `RoundState.add`, `finish`),
    calls `combine` per layer group and assembles the GlobalUpdate. `aggregate` is that loop for a whole list."""

    name: ClassVar[str]
    """The method's name in configs and on the command line."""
    display_name: ClassVar[str]
    """How the paper writes it, for tables and plots."""
    merges: ClassVar[bool] = False
    """True when the answer carries a merge that every client adds to its frozen weights (FLoRA, FedEx-LoRA,
    FRLoRA): the frozen weights then change, which 4-bit weights cannot take and a differential-privacy wrapper does
    not see."""
    sums_only: ClassVar[bool] = False
    """True when the answer needs only the weighted sums of the clients' factors, so the method can run under secure
    aggregation (which reveals only their sum); False when it needs each client's factors."""
    global_model: ClassVar[str] = ("the starting backbone (with the trained head) in base/ and the server's global "
                                   "factors in the adapter: the frozen weights never change.")
    """What the exported global model is, for its model card (base/ and the adapter are the export's folders)."""
    mixed_ranks: ClassVar[bool] = True
    """False when the method takes no clients of different ranks (`lora.client_ranks` is refused with it, and the
    round refuses a client of a lower rank)."""
    starts_from_weights: ClassVar[bool] = False
    """True when the run's LoRA start is the top-r SVD of each frozen weight, taken out of that weight
    (`frlora.svd_start`), instead of a random A and B = 0 (FRLoRA)."""
    starts_from_gradient: ClassVar[bool] = False
    """True when the run's LoRA start is cut from the gradient of the loss at the frozen weights, which every client
    takes on `init_batches` batches of its own data before round 1 (`fedsb.gradient_start`), instead of a random A
    and B = 0 (Fed-SB)."""
    init_batches: ClassVar[int] = 0
    """Batches per client of that gradient, for a method that `starts_from_gradient` (its option)."""
    needs: ClassVar[str] = "ideal"
    """What the method takes from a round: "averages" (weighted sums of A and B), "ideal" (those and the ideal
    update sum p_k B_k A_k, factored or dense), or "factors" (every client's factors, which it sends on)."""

    def client_rule(self, round_index: int) -> ClientRule:
        """What the clients train, upload and keep in round `round_index` (1, 2, ...): by default they train and
        upload both factors and keep nothing, starting every round from the server's state."""
        return ClientRule()

    def downloads(self, round_index: int) -> str:
        """The factors the server's answer to round `round_index` changes, the only ones that travel down: by default
        those the clients uploaded (a client holds the others already)."""
        return self.client_rule(round_index).sends

    @property
    def self_prunes(self) -> bool:
        """Whether the clients may lower their own LoRA rank after a round (`pruned_rank`; HetLoRA's rank
        self-pruning): the round loop then keeps each client's rank, shares it and checkpoints it."""
        return False

    def client_penalty(self, lora: Mapping[str, ranks.Pair]) -> Tensor | None:
        """A term each client adds to its training loss, of its live LoRA pairs at its own rank (gradients flow
        through it); None: none (the default)."""
        return None

    def pruned_rank(self, start: Mapping[str, ranks.Pair], trained: Mapping[str, ranks.Pair]) -> int:
        """The LoRA rank a client keeps from this round on, from the pairs it started the round from and those it
        trained (both at its rank); a lower rank than theirs means it uploads and keeps only its leading
        components. By default its rank."""
        return next(iter(trained.values()))[0].shape[0]

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
        """A method's own reason why the round cannot be aggregated with `update` next to `first` (its template);
        None: it can. `refusal` asks it first."""
        return None

    def refusal(self, index: int, update: ClientUpdate, first: ClientUpdate, rule: ClientRule) -> str | None:
        """Why the round cannot be aggregated with `update` next to `first` (its template) under the round's `rule`,
        raised by `finish` after every update's own checks: `check_update`, a client of a lower rank where the
        method takes none, or a factor the rule freezes that differs from the template's (in the client's rank and
        scaling, `ranks.to_client`). None: it can."""
        own = self.check_update(index, update, first)
        if own is not None:
            return own
        for name, pair in update.lora.items():
            rank, global_rank = pair[0].shape[0], first.lora[name][0].shape[0]
            if rank != global_rank and not self.mixed_ranks:
                return (f"{self.name}: client {index} has LoRA rank {rank} in layer '{name}', not the global "
                        f"{global_rank}; {self.display_name} takes no clients of other ranks (leave "
                        "lora.client_ranks unset)")
            given = ranks.to_client(first.lora[name], rank)
            for factor in rule.frozen:
                position = FACTORS.index(factor)
                if not torch.equal(pair[position], given[position]):
                    return (f"{self.name}: client {index} sent a different {factor} than client 0 for layer "
                            f"'{name}'; {self.display_name} clients train only {rule.trains} this round and must "
                            f"return the {factor} they were given, the same on every client (initialise it from "
                            "the same seed everywhere and do not train it)")
        return None

    def start(self, like: ClientUpdate, clients: int, path: str | None = None,
              lower_ranks: Sequence[int] = (), round_index: int = 1) -> RoundState:
        """A round expecting `clients` updates shaped like `like` (names, shapes, dtype and device of its LoRA
        layers and extra tensors; called client 0 in messages; its ranks are the global ones). path forces
        'factored' or 'dense' for every layer group instead of the cost model's choice (for tests and benchmarks).
        lower_ranks: ranks below the global one to return starting pairs for, besides those the round brings.
        round_index: the round (1, 2, ...), whose `client_rule` says which factors the clients upload: a factor
        they do not upload is the template's in the answer."""
        return RoundState(self, like, clients, path, lower_ranks, round_index)

    def aggregate(self, updates: Sequence[ClientUpdate], like: ClientUpdate | None = None,
                  lower_ranks: Sequence[int] = (), round_index: int = 1) -> GlobalUpdate:
        """All updates of a round at once: `start`, `add` each, `finish`. The weights are normalised first (in
        float64), so any finite weights work whatever the factors' dtype. like: the template (default: the update
        of the largest rank), which also gives every factor the clients do not upload this round."""
        total = check_weights(updates)
        check_round_shapes(updates)
        if like is None:
            template = max(range(len(updates)), key=lambda k: next(iter(updates[k].lora.values()))[0].shape[0])
            bad = find_bad_updates([updates[template]])
            if bad:  # the template's own checks would name it client 0
                raise ValueError(f"client {template}: {bad[0]}; drop this client (find_bad_updates lists them)")
            like = updates[template]
        state = self.start(like, clients=len(updates), lower_ranks=lower_ranks, round_index=round_index)
        for update in updates:
            state.add(replace(update, weight=float(update.weight) / total))
        return state.finish()

    def global_update(self, like: ClientUpdate, groups: list[LayerGroup], extra: dict[str, Tensor],
                      seconds: float, sends: str = FACTORS, downloads: str | None = None,
                      core: bool = False) -> GlobalUpdate:
        """`combine` every group and assemble the GlobalUpdate; seconds: time already spent on the round. sends:
        the factors the clients upload this round; downloads: those the answer changes, the only ones that travel
        down (None: `sends`; a client holds the others already); core: A travels both ways as its r x r core
        (`ClientRule.core`)."""
        downloads = sends if downloads is None else downloads
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
        up = {rank: _lora_bytes((ranks.to_client(pair, rank) for pair in like.lora.values()), sends, core)
              + extra_bytes for rank in groups[0].lower_ranks}
        return GlobalUpdate(lora=lora, merge=merge, extra=extra, metrics=metrics,
                            bytes_up=_lora_bytes(like.lora.values(), sends, core) + extra_bytes,
                            bytes_down=_lora_bytes((lora or {}).values(), downloads, core) + merge_bytes,
                            by_rank=by_rank,
                            bytes_by_rank={rank: (up[rank], _lora_bytes(by_rank.get(rank, {}).values(), downloads, core)
                                                  + merge_bytes) for rank in up})

    def _combine_checked(self, groups: list[LayerGroup]) -> list[GroupResult]:
        """`combine_groups`, plus the averaging bias (cos_avg, and each lower rank's cos_rank) every method logs
        unless its clients keep a factor of their own: the server's copy of that factor is not theirs, so the ideal
        update it would compare with is not the clients'. Finite inputs can still overflow (float32 with huge
        entries): that becomes a ValueError naming the layer instead of NaN in the result."""
        advice = f"the factors are too large for {groups[0].A_bar.dtype} (aggregate in float64 or check the clients)"
        try:
            results = self.combine_groups(groups)
        except torch.linalg.LinAlgError as error:
            names = [name for group in groups for name in group.names]
            raise ValueError(f"{self.name}: linear algebra failed on layers {names} ({error}); "
                             f"with finite inputs this means {advice}") from error
        ideal_known = not self.client_rule(groups[0].round_index).keeps
        for group, result in zip(groups, results, strict=True):
            if result.lora is not None:
                result.by_rank = {rank: result.by_rank.get(rank, result.lora) for rank in group.lower_ranks}
            if ideal_known:
                result.metrics = {"cos_avg": group.cosine_to_ideal(group.B_bar, group.A_bar), **result.metrics}
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



def _lora_bytes(pairs, factors: str, core: bool = False) -> int:
    """Bytes of the given factors ("A", "B" or "AB") of the pairs; core: an A (r x in) as its r x r core."""
    total = 0
    for pair in pairs:
        for factor in factors:
            tensor = pair[FACTORS.index(factor)]
            count = tensor.shape[0] ** 2 if core and factor == "A" else tensor.numel()
            total += count * tensor.element_size()
    return total


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


def _nbytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


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
