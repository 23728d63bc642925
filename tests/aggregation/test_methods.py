"""Every aggregation method against its dense textbook reference, its defining properties, and its errors."""

from __future__ import annotations

import itertools
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F

from lorafair.aggregation import ClientUpdate, build_aggregator, find_bad_updates, method_options, registered_methods
from lorafair.aggregation.reference import dense_reference
from lorafair.config import ServerConfig
from tests.helpers import (
    CASES,
    RANK,
    SHAPES,
    WEIGHTS,
    assert_matches_reference,
    averaged,
    dense_ideal,
    make_updates,
    product,
    shared_for,
)

LORAFAIR_OBJECTIVES = [{"objective": o, "residual_on": s} for o in ("cosine", "column_cosine", "frobenius")
                       for s in ("B", "A")]


@pytest.mark.parametrize(("method", "options"), CASES)
def test_fast_path_matches_dense_reference(method, options):
    updates = make_updates(shared_A=method == "ffa_lora")
    out = build_aggregator(method, **options).aggregate(updates)
    assert_matches_reference(method, out, dense_reference(method, updates, **options))
    assert list(out.lora or out.merge) == list(SHAPES)
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(out.extra[name], sum(u.weight / sum(WEIGHTS) * u.extra[name] for u in updates))


@pytest.mark.parametrize("options", LORAFAIR_OBJECTIVES)
def test_lorafair_corrects_the_factor_and_raises_the_cosine(options):
    updates = make_updates()
    out = build_aggregator("lorafair", **options).aggregate(updates)
    corrected, kept = (1, 0) if options["residual_on"] == "B" else (0, 1)
    for name in SHAPES:
        torch.testing.assert_close(out.lora[name][kept], averaged(updates, name, kept))
        assert (out.lora[name][corrected] - averaged(updates, name, corrected)).norm() > 1e-3
    assert out.metrics["cos_mean"] > out.metrics["cos_avg_mean"] + 1e-3
    assert out.metrics["cos_min"] > out.metrics["cos_avg_min"]


@pytest.mark.parametrize("objective", ["cosine", "column_cosine"])
def test_relative_lorafair_is_scale_free_and_never_below_averaging_on_small_factors(objective):
    """Factors at the size of early rounds (B ~ 1e-4): the literal absolute SGD overshoots, the relative one
    improves on averaging and returns the same B' / ||B_bar|| at every scale."""
    def scaled(updates, factor):
        return [replace(u, lora={n: (A, factor * B) for n, (A, B) in u.lora.items()}) for u in updates]

    updates = make_updates()
    small, large = scaled(updates, 1e-4), scaled(updates, 1.0)
    relative = build_aggregator("lorafair", objective=objective)
    out_small, out_large = relative.aggregate(small), relative.aggregate(large)
    for name in SHAPES:
        torch.testing.assert_close(out_small.lora[name][1] * 1e4, out_large.lora[name][1], rtol=1e-6, atol=1e-9)
    assert out_small.metrics["cos_mean"] > out_small.metrics["cos_avg_mean"]
    literal = build_aggregator("lorafair", objective=objective, relative=False).aggregate(small)
    assert literal.metrics["cos_factor_min"] < out_small.metrics["cos_factor_min"]


def test_lorafair_metrics_equal_dense_cosines():
    updates = make_updates()
    out = build_aggregator("lorafair").aggregate(updates)

    def cosine(x, y):
        return F.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()

    after = [cosine(dense_ideal(updates, n), product(out.lora[n])) for n in SHAPES]
    before = [cosine(dense_ideal(updates, n), averaged(updates, n, 1) @ averaged(updates, n, 0)) for n in SHAPES]
    factor = [cosine(averaged(updates, n, 1), out.lora[n][1]) for n in SHAPES]
    expected = {"cos_mean": sum(after) / 3, "cos_min": min(after), "cos_avg_mean": sum(before) / 3,
                "cos_avg_min": min(before), "cos_factor_mean": sum(factor) / 3, "cos_factor_min": min(factor)}
    assert out.metrics == pytest.approx({**expected, "solve_seconds": out.metrics["solve_seconds"]}, rel=1e-9)
    assert out.metrics["solve_seconds"] > 0


@pytest.mark.parametrize("lam", [0.0, 0.01, 5.0])
@pytest.mark.parametrize("side", ["B", "A"])
def test_closed_form_equals_dense_ridge(lam, side):
    updates = make_updates(seed=3)
    options = {"objective": "frobenius", "lam": lam, "residual_on": side}
    out = build_aggregator("lorafair", **options).aggregate(updates)
    assert_matches_reference("lorafair", out, dense_reference("lorafair", updates, **options))


def test_large_lam_gives_B_bar_back():
    updates = make_updates()

    def correction_norm(**options):
        out = build_aggregator("lorafair", **options).aggregate(updates)
        return sum((out.lora[n][1] - averaged(updates, n, 1)).norm() for n in SHAPES)

    assert correction_norm(objective="frobenius", lam=1e9) < 1e-7 * correction_norm(objective="frobenius")
    # SGD needs lr * lam < 1; the largest allowed lam still shrinks the correction by orders of magnitude.
    assert correction_norm(lam=99.0) < 1e-2 * correction_norm(lam=0.0)


def test_lorafair_xavier_start_is_seeded():
    updates = make_updates()
    name = "blocks.0.mlp.fc2"

    def xavier(seed, steps=500):
        return build_aggregator("lorafair", init="xavier", seed=seed, steps=steps)

    def B_prime(aggregator):
        return aggregator.aggregate(updates).lora[name][1]

    first = xavier(7)
    round_1 = B_prime(first)
    assert torch.equal(round_1, B_prime(xavier(7)))
    assert not torch.equal(round_1, B_prime(xavier(8)))
    assert not torch.equal(round_1, B_prime(first))  # the next round draws a new start
    start = B_prime(xavier(7, steps=0)) - averaged(updates, name, 1)
    bound = (6 / (SHAPES[name][0] + RANK)) ** 0.5
    assert 0 < start.abs().max() <= bound
    assert start.abs().mean() == pytest.approx(bound / 2, rel=0.3)


def frobenius_error(updates, out):
    return sum((product(out.lora[n]) - dense_ideal(updates, n)).norm() ** 2 for n in SHAPES).sqrt()


def test_florana_error_never_worse_than_averaging_and_falls_with_sweeps():
    updates = make_updates(seed=5)
    errors = [frobenius_error(updates, build_aggregator("florana", sweeps=s).aggregate(updates)) for s in range(5)]
    assert errors[0] == pytest.approx(frobenius_error(updates, build_aggregator("fedit").aggregate(updates)))
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in itertools.pairwise(errors))
    assert errors[1] < errors[0]
    optimum = frobenius_error(updates, build_aggregator("flexlora").aggregate(updates))
    assert optimum <= errors[-1] * (1 + 1e-12)


def test_flexlora_factors_are_an_svd():
    updates = make_updates()
    out = build_aggregator("flexlora").aggregate(updates)
    for name in SHAPES:
        A, B = out.lora[name]
        torch.testing.assert_close(A @ A.T, torch.eye(RANK, dtype=A.dtype))
        singular_values = torch.linalg.svdvals(dense_ideal(updates, name))[:RANK]
        torch.testing.assert_close(B.norm(dim=0), singular_values)


@pytest.mark.parametrize(("method", "options"), CASES)
def test_single_client_gets_its_own_update_back(method, options):
    (update,) = make_updates(weights=(3.0,))
    out = build_aggregator(method, **options).aggregate([update])
    for name in SHAPES:
        own = update.lora[name]
        if method == "flora":
            assert out.lora is None
            torch.testing.assert_close(product(out.merge[name]), product(own))
        elif method == "flexlora":
            torch.testing.assert_close(product(out.lora[name]), product(own))
        else:
            torch.testing.assert_close(out.lora[name], own)
        if method == "fedex_lora":
            torch.testing.assert_close(product(out.merge[name]), torch.zeros_like(product(own)))


def test_bytes_per_client_per_round():
    sizes = sum(RANK * (fan_in + fan_out) for fan_out, fan_in in SHAPES.values())
    B_only = sum(RANK * fan_out for fan_out, _ in SHAPES.values())
    A_only = sum(RANK * fan_in for _, fan_in in SHAPES.values())
    cores = len(SHAPES) * RANK * RANK  # Fed-SB: A travels as its r x r core
    head = (5 * 7 + 5) * 8
    for K in (2, 4):
        updates = make_updates(weights=WEIGHTS[:K], shared_A=True, shared_B=True)
        up = {"ffa_lora": B_only, "fedsa_lora": A_only, "rolora": B_only, "fedsvd": B_only, "fed_sb": cores}
        expected_down = {"fedit": sizes, "ffa_lora": B_only, "flora": K * sizes, "flexlora": sizes,
                         "lorafair": sizes, "florana": sizes, "fedex_lora": sizes + (K + 1) * sizes,
                         "fedsa_lora": A_only, "rolora": B_only, "fedsvd": sizes, "hetlora": sizes,
                         "frlora": 2 * sizes, "feddpa": sizes, "fed_sb": cores}
        for method in registered_methods():
            out = build_aggregator(method).aggregate(updates)
            assert out.bytes_up == up.get(method, sizes) * 8 + head
            assert out.bytes_down == expected_down[method] * 8 + head
        second = build_aggregator("rolora").aggregate(updates, round_index=2)  # RoLoRA's even rounds: A only
        assert (second.bytes_up, second.bytes_down) == (A_only * 8 + head, A_only * 8 + head)


def test_float32_matches_float64_reference():
    def as_float(update):
        return ClientUpdate(update.weight, {n: (A.float(), B.float()) for n, (A, B) in update.lora.items()},
                            {n: t.float() for n, t in update.extra.items()})

    def as_double(pairs):
        return pairs and {n: (A.double(), B.double()) for n, (A, B) in pairs.items()}

    for method in registered_methods():
        updates = make_updates(**shared_for(method))
        out = build_aggregator(method).aggregate([as_float(u) for u in updates])
        for A, B in (*(out.lora or {}).values(), *(out.merge or {}).values()):
            assert A.dtype == B.dtype == torch.float32
        out64 = replace(out, lora=as_double(out.lora), merge=as_double(out.merge))
        assert_matches_reference(method, out64, dense_reference(method, updates), atol=1e-4, rtol=1e-4)


def test_works_under_inference_mode():
    for method, options in CASES:
        updates = make_updates(shared_A=method == "ffa_lora")
        with torch.inference_mode():
            inference_updates = [ClientUpdate(u.weight, {n: (A.clone(), B.clone()) for n, (A, B) in u.lora.items()})
                                 for u in updates]
            out = build_aggregator(method, **options).aggregate(inference_updates)
        expected = build_aggregator(method, **options).aggregate(updates)
        for got, want in ((out.lora, expected.lora), (out.merge, expected.merge)):
            assert (got is None and want is None) or all(torch.equal(got[n][i], want[n][i]) for n in SHAPES
                                                         for i in (0, 1))


def test_find_bad_updates_lets_the_rest_be_aggregated():
    updates = make_updates(weights=(1.0, 2.0, 3.0, 4.0, 5.0))
    updates[1].lora["blocks.0.mlp.fc2"][0][2, 3] = float("nan")
    updates[3].extra["head.bias"][0] = float("inf")
    bad = find_bad_updates(updates)
    assert sorted(bad) == [1, 3]
    assert "blocks.0.mlp.fc2" in bad[1] and " A" in bad[1]
    assert "head.bias" in bad[3]
    kept = [u for i, u in enumerate(updates) if i not in bad]
    out = build_aggregator("fedit").aggregate(kept)
    torch.testing.assert_close(out.lora["blocks.0.mlp.fc2"][1], averaged(kept, "blocks.0.mlp.fc2", 1))
    assert find_bad_updates(kept) == {}


def _set(update, name, factor, value):
    pair = list(update.lora[name])
    pair[factor] = value
    update.lora[name] = tuple(pair)


def _nan_in_B(updates):
    updates[2].lora["blocks.0.mlp.fc2"][1][0, 0] = float("nan")


def _inf_in_extra(updates):
    updates[1].extra["head.weight"][1, 1] = float("-inf")


def _missing_layer(updates):
    del updates[3].lora["blocks.1.attn.proj"]


def _wrong_shape(updates):
    _set(updates[1], "blocks.0.mlp.fc2", 0, torch.randn(RANK, 16, dtype=torch.float64))


def _other_rank(updates):
    updates[2].lora["blocks.0.attn.proj"] = (torch.randn(2, 10, dtype=torch.float64),
                                             torch.randn(12, 2, dtype=torch.float64))


def _ranks_differ_within_client(updates):
    _set(updates[1], "blocks.0.attn.proj", 1, torch.randn(12, 2, dtype=torch.float64))


def _other_dtype(updates):
    _set(updates[1], "blocks.0.attn.proj", 1, updates[1].lora["blocks.0.attn.proj"][1].float())


def _integer_factor(updates):
    _set(updates[0], "blocks.0.attn.proj", 0, torch.ones(RANK, 10, dtype=torch.int64))


def _not_a_tensor(updates):
    _set(updates[2], "blocks.0.attn.proj", 0, [[1.0]])


def _extra_shape(updates):
    updates[3].extra["head.bias"] = torch.zeros(6, dtype=torch.float64)


def _negative_weight(updates):
    updates[1].weight = -1.0


def _nan_weight(updates):
    updates[2].weight = float("nan")


def _zero_weights(updates):
    for update in updates:
        update.weight = 0


BAD_INPUTS = [
    (_nan_in_B, r"client 2: NaN or Inf in layer 'blocks.0.mlp.fc2' B"),
    (_inf_in_extra, r"client 1, extra tensor 'head.weight': has NaN or Inf"),
    (_missing_layer, r"client 3: LoRA layers differ from client 0's: missing \['blocks.1.attn.proj'\]"),
    (_wrong_shape, r"client 1, layer 'blocks.0.mlp.fc2': A, B have shapes \(3, 16\), \(12, 3\) but the round's "
                   r"template \(client 0\) has rank 3, in 17, out 12; a client may have a lower rank, never another "
                   r"layer size"),
    (_other_rank, r"client 2: LoRA ranks \[2, 3\] differ from the template's; a client of a lower rank has one rank "
                  r"r < 3 for all its layers"),
    (_ranks_differ_within_client, r"client 1, layer 'blocks.0.attn.proj': A is r x in = \(3, 10\) and B is "
                                  r"out x r = \(12, 2\)"),
    (_other_dtype, r"client 1, layer 'blocks.0.attn.proj': B is torch.float32 on cpu but client 0's"),
    (_integer_factor, r"client 0, layer 'blocks.0.attn.proj': A is torch.int64; LoRA factors must be float32"),
    (_not_a_tensor, r"client 2, layer 'blocks.0.attn.proj': A must be a non-empty 2-D tensor, got list"),
    (_extra_shape, r"client 3, extra tensor 'head.bias': .* shape \(6,\) .* differs from client 0's"),
    (_negative_weight, r"client 1: weight must be a finite number >= 0"),
    (_nan_weight, r"client 2: weight must be a finite number >= 0 \(its example count\), got nan"),
    (_zero_weights, r"the client weights sum to 0"),
]


@pytest.mark.parametrize(("corrupt", "message"), BAD_INPUTS, ids=[c.__name__ for c, _ in BAD_INPUTS])
@pytest.mark.parametrize("method", registered_methods())
def test_bad_input_is_refused_with_client_and_layer(corrupt, message, method):
    updates = make_updates(shared_A=True)
    corrupt(updates)
    with pytest.raises(ValueError, match=message):
        build_aggregator(method).aggregate(updates)


def test_empty_round_is_refused():
    with pytest.raises(ValueError, match="at least one ClientUpdate, got an empty list"):
        build_aggregator("fedit").aggregate([])


def test_ffa_lora_refuses_different_A():
    updates = make_updates(shared_A=True)
    _set(updates[2], "blocks.1.attn.proj", 0, updates[2].lora["blocks.1.attn.proj"][0] + 1e-3)
    message = r"client 2 sent a different A than client 0 for layer 'blocks\.1\.attn\.proj'"
    with pytest.raises(ValueError, match=message):
        build_aggregator("ffa_lora").aggregate(updates)


@pytest.mark.parametrize("method", registered_methods())
def test_overflow_is_refused(method):
    updates = make_updates(dtype=torch.float32, **shared_for(method))
    for update in updates:
        update.lora = {n: (A * 1e25, B * 1e25) for n, (A, B) in update.lora.items()}
    aggregator = build_aggregator(method)
    if aggregator.client_rule(1).keeps:  # FedSA-LoRA: only A_bar, no cosine that squares the entries
        out = aggregator.aggregate(updates)
        assert all(bool(torch.isfinite(A).all()) for A, _ in out.lora.values())
        return
    with pytest.raises(ValueError, match=rf"{method}: .*blocks.0.attn.proj.* finite.* too large for torch.float32"):
        aggregator.aggregate(updates)


@pytest.mark.parametrize(("method", "options", "message"), [
    ("fedavg", {}, "unknown aggregation method 'fedavg'; valid methods: fedit, ffa_lora, flora, flexlora, "
                   "lorafair, florana, fedex_lora"),
    ("fedit", {"lam": 0.1}, "fedit: unknown option.* lam; its options are: none"),
    ("lorafair", {"lamda": 0.1}, "lorafair: unknown option.* lamda; its options are: lam, objective, steps, lr, "
                                 "init, seed, residual_on"),
    ("lorafair", {"objective": "l2"}, r"lorafair: option objective must be one of \('cosine', 'column_cosine', "
                                      r"'frobenius'\), got 'l2'"),
    ("lorafair", {"lam": -1.0}, "option lam must be a number >= 0, got -1.0"),
    ("lorafair", {"lam": 200.0}, "option lam must be below 1 / lr = 100 for SGD to converge"),
    ("lorafair", {"steps": 2.5}, "option steps must be an integer >= 0, got 2.5"),
    ("lorafair", {"lr": 0}, "option lr must be a number > 0, got 0"),
    ("lorafair", {"init": "normal"}, "option init must be one of"),
    ("lorafair", {"residual_on": "C"}, "option residual_on must be one of"),
    ("florana", {"sweeps": -1}, "florana: option sweeps must be an integer >= 0, got -1"),
])
def test_bad_method_or_option_is_refused(method, options, message):
    with pytest.raises(ValueError, match=message):
        build_aggregator(method, **options)


def test_methods_and_options_line_up_with_the_server_config():
    server_fields = {f.name: f.default for f in fields(ServerConfig)}
    for method in registered_methods():
        for option, default in method_options(method).items():
            if option != "seed":  # the run's seed
                assert server_fields[option] == default, (method, option)
