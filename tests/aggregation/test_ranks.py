"""Clients of different LoRA ranks: every method against its dense reference, the scaling convention checked both
ways on dense matrices (ranks {4, 16}, a fixed alpha), bytes per rank, and rounds that add up across processes."""

from __future__ import annotations

import pytest
import torch

from lorafair.aggregation import ClientUpdate, build_aggregator
from lorafair.aggregation.reference import dense_reference
from tests.helpers import CASES, FLOAT64, SHAPES, finish_in_two_groups, make_updates, product

RANKS = (3, 1, 2, 3)
"""Client k's rank; the global rank is 3."""


def mixed_updates(ranks=RANKS, shared_A=False):
    """make_updates' clients cut to their ranks (FFA-LoRA: the leading rows of one shared A)."""
    updates = make_updates(weights=(1.0, 2.5, 0.5, 4.0)[:len(ranks)], shared_A=shared_A)
    return [ClientUpdate(u.weight, {name: (A[:rank].clone(), B[:, :rank].clone()) for name, (A, B) in u.lora.items()},
                         u.extra) for u, rank in zip(updates, ranks, strict=True)]


@pytest.mark.parametrize(("method", "options"), [*CASES, ("lorafair", {"lower_ranks": "zero_pad"})])
def test_every_method_matches_its_dense_reference_at_mixed_ranks(method, options):
    updates = mixed_updates(shared_A=method == "ffa_lora")
    out = build_aggregator(method, **options).aggregate(updates)
    reference = dense_reference(method, updates, **options)
    compare = product if method == "flexlora" else (lambda pair: pair)  # singular vectors: up to sign
    for name in SHAPES:
        if reference.lora is not None:
            torch.testing.assert_close(compare(out.lora[name]), compare(reference.lora[name]), **FLOAT64)
        if reference.merge is not None:
            torch.testing.assert_close(product(out.merge[name]), reference.merge[name], **FLOAT64)
    assert sorted(out.by_rank) == sorted(reference.by_rank) == ([] if method == "flora" else [1, 2])
    for rank, pairs in reference.by_rank.items():
        for name, pair in pairs.items():
            assert out.by_rank[rank][name][0].shape == (rank, pair[0].shape[1])
            torch.testing.assert_close(compare(out.by_rank[rank][name]), compare(pair), **FLOAT64)


def test_lorafair_solves_each_rank_apart_and_zero_pad_truncates_the_global_solution():
    updates = mixed_updates()
    solved = build_aggregator("lorafair").aggregate(updates)
    padded = build_aggregator("lorafair", lower_ranks="zero_pad").aggregate(updates)
    name = "blocks.0.attn.proj"
    torch.testing.assert_close(solved.lora[name], padded.lora[name], atol=0, rtol=0)  # the global rank: the same
    A, B = padded.lora[name]
    torch.testing.assert_close(padded.by_rank[2][name], (A[:2], B[:, :2] * (2 / 3)), atol=0, rtol=0)
    assert not torch.allclose(solved.by_rank[2][name][1], padded.by_rank[2][name][1])
    assert {"cos_rank1_mean", "cos_rank2_mean"} <= solved.metrics.keys()


@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "flora", "flexlora", "lorafair", "florana", "fedex_lora"])
def test_scaling_convention_with_ranks_4_and_16_against_dense_matrices(method):
    """The model each client ends up with, in effective units (alpha / r) B A on dense matrices: the server's
    ideal update is sum p_k s_k B_k A_k, and the rank-4 client's starting pair with its own s_4 is exactly the
    global pair's leading four components (FlexLoRA: the best rank-4 approximation of the ideal update; LoRA-FAIR
    under zero_pad; its own solve per rank is held to the dense reference above)."""
    alpha, fan_out, fan_in = 32.0, 20, 24
    generator = torch.Generator().manual_seed(3)
    shared_A = torch.randn(16, fan_in, generator=generator, dtype=torch.float64)
    updates = []
    for rank, weight in ((4, 3.0), (16, 1.0)):
        A = shared_A[:rank].clone() if method == "ffa_lora" else torch.randn(rank, fan_in, generator=generator,
                                                                              dtype=torch.float64)
        B = torch.randn(fan_out, rank, generator=generator, dtype=torch.float64)
        updates.append(ClientUpdate(weight, {"layer": (A, B)}))
    effective = sum(u.weight / 4.0 * (alpha / u.lora["layer"][0].shape[0]) * product(u.lora["layer"])
                    for u in updates)
    out = build_aggregator(method, **({"lower_ranks": "zero_pad"} if method == "lorafair" else {})).aggregate(updates)
    s4, s16 = alpha / 4, alpha / 16
    if method in ("flora", "fedex_lora"):  # the global model is exact
        start = product(out.lora["layer"]) if out.lora else 0
        torch.testing.assert_close(s16 * (product(out.merge["layer"]) + start), effective, **FLOAT64)
    if method == "ffa_lora":  # averaging B is exact for a shared A
        torch.testing.assert_close(s16 * product(out.lora["layer"]), effective, **FLOAT64)
    if out.lora is None:
        return
    A, B = out.lora["layer"]
    torch.testing.assert_close(s4 * product(out.by_rank[4]["layer"]), s16 * B[:, :4] @ A[:4], **FLOAT64)
    if method == "flexlora":
        U, S, Vh = torch.linalg.svd(effective)
        for rank, scaling, pair in ((4, s4, out.by_rank[4]["layer"]), (16, s16, out.lora["layer"])):
            torch.testing.assert_close(scaling * product(pair), U[:, :rank] * S[:rank] @ Vh[:rank], **FLOAT64)


def test_homogeneous_rounds_have_no_lower_ranks_and_requested_ranks_are_returned():
    updates = make_updates()
    out = build_aggregator("fedit").aggregate(updates)
    assert out.by_rank == {} and out.bytes_by_rank == {}
    asked = build_aggregator("fedit").aggregate(updates, lower_ranks=[1])
    A, B = asked.lora["blocks.0.attn.proj"]
    torch.testing.assert_close(asked.by_rank[1]["blocks.0.attn.proj"], (A[:1], B[:, :1] * (1 / 3)), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"lower_ranks must be integers in \[1, 3\)"):
        build_aggregator("fedit").aggregate(updates, lower_ranks=[3])


def test_bytes_follow_each_clients_rank():
    updates = mixed_updates(shared_A=True)
    per_rank = sum(fan_in + fan_out for fan_out, fan_in in SHAPES.values()) * 8
    B_per_rank = sum(fan_out for fan_out, _ in SHAPES.values()) * 8
    head = (5 * 7 + 5) * 8
    for method in ("fedit", "ffa_lora", "flora", "fedex_lora"):
        out = build_aggregator(method).aggregate(updates)
        unit = B_per_rank if method == "ffa_lora" else per_rank
        stacked = sum(RANKS) * per_rank  # the padding of lower-rank clients is not sent
        merge = {"flora": stacked, "fedex_lora": stacked + 3 * per_rank}.get(method, 0)
        for rank in (1, 2):
            own = 0 if method == "flora" else rank * unit
            assert out.bytes_for(rank) == (rank * unit + head, own + merge + head)
        assert out.bytes_for(3) == (out.bytes_up, out.bytes_down) == (3 * unit + head,
                                                                      (0 if method == "flora" else 3 * unit)
                                                                      + merge + head)


@pytest.mark.parametrize("method", ["fedit", "flora", "lorafair", "fedex_lora"])
def test_accumulators_of_disjoint_mixed_rank_clients_add_up_to_one_round(method):
    updates = mixed_updates()
    aggregator = build_aggregator(method)
    merged = finish_in_two_groups(aggregator, updates)
    whole = aggregator.aggregate(updates)
    assert sorted(merged.by_rank) == sorted(whole.by_rank)
    for name in SHAPES:
        for got, want in ((merged.lora, whole.lora), (merged.merge, whole.merge), *(
                (merged.by_rank[rank], whole.by_rank[rank]) for rank in whole.by_rank)):
            if want is not None:
                torch.testing.assert_close(product(got[name]), product(want[name]), **FLOAT64)


def test_a_client_above_the_template_rank_or_with_mixed_layer_ranks_is_refused():
    updates = mixed_updates()
    state = build_aggregator("fedit").start(updates[2], clients=4)  # the template has rank 2
    with pytest.raises(ValueError, match=r"client 0, layer 'blocks.0.attn.proj': .* a higher rank"):
        state.add(updates[0])
