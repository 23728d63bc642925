"""The two paths of the ideal update (factored, dense) against the dense references, the cost model's choice on
both sides of the crossover, and the streaming round: start / add / finish, refusals, and accumulators that add up
across disjoint groups of clients (what an all_reduce across ranks does)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lorafair.aggregation import ClientUpdate, build_aggregator
from lorafair.aggregation.cost import IdealUse, cheaper_path
from lorafair.aggregation.reference import dense_reference
from tests.helpers import (
    CASES,
    FLOAT64,
    SHAPES,
    assert_matches_reference,
    averaged,
    dense_ideal,
    finish_in_two_groups,
    make_updates,
)

PATHS = ("factored", "dense")


CASE_IDS = [f"{method}-{'-'.join(map(str, options.values()))}" for method, options in CASES]


FLOAT32 = {"atol": 1e-4, "rtol": 1e-4}


def fold(method, options, updates, path=None, slots=None):
    state = build_aggregator(method, **options).start(updates[0], clients=len(updates), path=path)
    for index, update in enumerate(updates):
        state.add(update, slot=None if slots is None else slots[index])
    return state


def dense_cosine(updates, name):
    """The cosine between the ideal update and the product of the averaged factors, from dense matrices."""
    return F.cosine_similarity(dense_ideal(updates, name).flatten(),
                               (averaged(updates, name, 1) @ averaged(updates, name, 0)).flatten(), dim=0).item()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("method", "options"), CASES, ids=CASE_IDS)
def test_both_paths_match_the_dense_reference(method, options, path):
    updates = make_updates(shared_A=method == "ffa_lora")
    state = fold(method, options, updates, path=path)
    if method != "ffa_lora":  # FFA-LoRA needs no ideal update: dW = B_bar A exactly
        assert set(state.paths.values()) == {path}
    out = state.finish()
    assert_matches_reference(method, out, dense_reference(method, updates, **options), **FLOAT64)
    cosines = [dense_cosine(updates, name) for name in SHAPES]
    assert out.metrics["cos_avg_mean"] == pytest.approx(sum(cosines) / len(cosines), rel=1e-9)
    assert out.metrics["cos_avg_min"] == pytest.approx(min(cosines), rel=1e-9)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["fedit", "flexlora", "lorafair", "florana", "fedex_lora", "flora"])
def test_both_paths_in_float32_stay_near_the_float64_reference(method, path):
    updates = make_updates()
    singles = [ClientUpdate(u.weight, {n: (A.float(), B.float()) for n, (A, B) in u.lora.items()},
                            {n: t.float() for n, t in u.extra.items()}) for u in updates]
    out = fold(method, {}, singles, path=path).finish()
    as_double = {"lora": out.lora and {n: (A.double(), B.double()) for n, (A, B) in out.lora.items()},
                 "merge": out.merge and {n: (A.double(), B.double()) for n, (A, B) in out.merge.items()}}
    assert_matches_reference(method, replace(out, **as_double), dense_reference(method, updates), **FLOAT32)


WIDE = {"wide.0": (40, 30), "wide.1": (40, 30)}
"""Crossover of a 40 x 30 layer: K r = 40 * 30 / 70 = 17.1, i.e. between 8 and 9 clients at rank 2."""


def wide_updates(clients, rank=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [ClientUpdate(weight=1.0 + client, lora={name: (torch.randn(rank, fan_in, generator=generator,
                                                                      dtype=torch.float64),
                                                          torch.randn(fan_out, rank, generator=generator,
                                                                      dtype=torch.float64))
                                                    for name, (fan_out, fan_in) in WIDE.items()})
            for client in range(clients)]


@pytest.mark.parametrize(("clients", "path"), [(3, "factored"), (30, "dense")])
@pytest.mark.parametrize("method", ["fedit", "flexlora", "lorafair", "florana", "flora", "fedex_lora"])
def test_the_cost_model_picks_each_side_of_the_crossover_and_both_match_the_reference(method, clients, path):
    updates = wide_updates(clients)
    state = fold(method, {}, updates)
    assert set(state.paths.values()) == {path}
    out = state.finish()
    reference = dense_reference(method, updates)
    for name in WIDE:
        if reference.lora is not None:
            got, want = out.lora[name], reference.lora[name]
            torch.testing.assert_close(got[1] @ got[0], want[1] @ want[0], **FLOAT64)
        if reference.merge is not None:
            torch.testing.assert_close(out.merge[name][1] @ out.merge[name][0], reference.merge[name], **FLOAT64)


def test_crossover_at_vit_b_sizes_is_where_stacked_ranks_reach_out_in_over_out_plus_in():
    """Hand-worked: for FedIT's cos_avg the paths cost 2 S^2 (m + n) + 2 r S (m + n) against
    2 S m n + 2 m n + 2 r m n, equal near S = m n / (m + n): 614.4 for 768 x 3072, 384 for 768 x 768."""
    assert cheaper_path(IdealUse(), 38, 16, 768, 3072) == "factored"  # S = 608
    assert cheaper_path(IdealUse(), 39, 16, 768, 3072) == "dense"  # S = 624
    assert cheaper_path(IdealUse(), 23, 16, 768, 768) == "factored"  # S = 368
    assert cheaper_path(IdealUse(), 25, 16, 768, 768) == "dense"  # S = 400
    # The SVD makes the factored QR dearer than the dense Gram's eigh only well past that crossover.
    assert cheaper_path(IdealUse(svd=True), 6, 16, 768, 3072) == "factored"
    assert cheaper_path(IdealUse(svd=True), 300, 16, 768, 3072) == "dense"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("method", "options"), CASES, ids=CASE_IDS)
def test_accumulators_of_disjoint_clients_add_up_to_one_round(method, options, path):
    """Two states fold clients {0, 2} and {1, 3} into their slots; summing their accumulators (an all_reduce
    SUM across two ranks) and finishing equals one state that folded all four (which the test above holds to
    the dense reference), factor by factor."""
    updates = make_updates(shared_A=method == "ffa_lora")
    aggregator = build_aggregator(method, **options)
    merged = finish_in_two_groups(aggregator, updates, path=path)
    whole = fold(method, options, updates, path=path).finish()
    for got, want in ((merged.lora, whole.lora), (merged.merge, whole.merge)):
        assert (got is None) == (want is None)
        for name in want or {}:
            torch.testing.assert_close(got[name], want[name], **FLOAT64)
    assert merged.bytes_down == whole.bytes_down
    assert merged.metrics["cos_avg_mean"] == pytest.approx(whole.metrics["cos_avg_mean"], rel=1e-9)


@pytest.mark.parametrize(("method", "grows"), [("fedit", False), ("lorafair", False), ("flexlora", False),
                                               ("florana", False), ("ffa_lora", False), ("flora", True),
                                               ("fedex_lora", True)])
def test_dense_accumulators_do_not_grow_with_the_clients_but_kept_factors_do(method, grows):
    def shapes(clients):
        updates = make_updates(weights=[1.0] * clients, shared_A=True)
        state = fold(method, {}, updates, path="dense")
        return [tuple(tensor.shape) for tensor in state.accumulators()]

    assert (shapes(3) != shapes(9)) == grows


def test_a_refused_update_leaves_the_round_as_it_was():
    updates = make_updates(weights=(1.0, 2.0, 3.0, 4.0, 5.0))
    bad = replace(updates[2], lora={**updates[2].lora, "blocks.0.mlp.fc2": (updates[2].lora["blocks.0.mlp.fc2"][0],
                                                                              torch.full((12, 3), float("nan"),
                                                                                         dtype=torch.float64))})
    for path in PATHS:
        state = build_aggregator("florana").start(updates[0], clients=5, path=path)
        for index, update in enumerate(updates):
            if index == 2:
                with pytest.raises(ValueError, match=r"client 2: NaN or Inf in layer 'blocks\.0\.mlp\.fc2' B"):
                    state.add(bad, slot=2)
            else:
                state.add(update, slot=index)
        kept = [u for i, u in enumerate(updates) if i != 2]
        assert_matches_reference("florana", state.finish(), dense_reference("florana", kept), **FLOAT64)


def test_streaming_refuses_bad_slots_and_an_empty_round():
    updates = make_updates()
    state = build_aggregator("flora").start(updates[0], clients=2)
    with pytest.raises(ValueError, match="needs at least one added ClientUpdate"):
        state.finish()
    state.add(updates[0], slot=1)
    with pytest.raises(ValueError, match="slot 1 already holds a client"):
        state.add(updates[1], slot=1)
    with pytest.raises(ValueError, match=r"slot must be an integer in \[0, 2\)"):
        state.add(updates[1], slot=2)
    with pytest.raises(ValueError, match="clients >= 1"):
        build_aggregator("fedit").start(updates[0], clients=0)
    with pytest.raises(ValueError, match="path must be None"):
        build_aggregator("fedit").start(updates[0], clients=2, path="sparse")


def test_ffa_lora_refuses_a_different_A_at_finish_after_every_client_was_checked():
    updates = make_updates(shared_A=True)
    other = replace(updates[1], lora={**updates[1].lora, "blocks.0.attn.proj": (
        updates[1].lora["blocks.0.attn.proj"][0] + 1e-3, updates[1].lora["blocks.0.attn.proj"][1])})
    state = build_aggregator("ffa_lora").start(updates[0], clients=4)
    state.add(updates[0])
    state.add(other)
    with pytest.raises(ValueError, match="client 3: NaN or Inf"):
        state.add(replace(updates[3], weight=1.0, lora={**updates[3].lora, "blocks.1.attn.proj": (
            torch.full((3, 10), float("inf"), dtype=torch.float64), updates[3].lora["blocks.1.attn.proj"][1])}),
            slot=3)
    message = r"client 1 sent a different A than client 0 for layer 'blocks\.0\.attn\.proj'"
    with pytest.raises(ValueError, match=message):
        state.finish()


def test_one_shot_aggregate_equals_the_streamed_round_with_unnormalised_weights():
    for method, options in CASES:
        updates = make_updates(shared_A=method == "ffa_lora")
        one_shot = build_aggregator(method, **options).aggregate(updates)
        streamed = fold(method, options, updates).finish()
        for got, want in ((streamed.lora, one_shot.lora), (streamed.merge, one_shot.merge)):
            for name in (want or {}):
                torch.testing.assert_close(got[name][1] @ got[name][0], want[name][1] @ want[name][0], **FLOAT64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ffa_lora_returns_the_shared_A_bit_for_bit(dtype):
    """A weighted average of equal A's is A only up to rounding; FFA-LoRA's A must not drift round after round."""
    updates = make_updates(weights=(0.1, 0.7, 0.3), dtype=dtype, shared_A=True)
    out = build_aggregator("ffa_lora").aggregate(updates)
    for name in SHAPES:
        assert torch.equal(out.lora[name][0], updates[0].lora[name][0])


@pytest.mark.parametrize("method", ["feddpa", "frlora"])
def test_methods_averaging_both_trained_factors_log_the_averaging_bias_of_the_dense_reference(method):
    """FedDPA's shared pair and FRLoRA's pair are both trained by every client and averaged factor by factor, as
    FedIT's: B_bar A_bar is not the ideal update, and cos_avg must say by how much (not 1 by construction, as for a
    method whose averaged product is exact)."""
    updates = make_updates()
    out = fold(method, {}, updates).finish()
    cosines = [dense_cosine(updates, name) for name in SHAPES]
    assert max(cosines) < 0.999
    assert out.metrics["cos_avg_mean"] == pytest.approx(sum(cosines) / len(cosines), rel=1e-9)
    assert out.metrics["cos_avg_min"] == pytest.approx(min(cosines), rel=1e-9)
