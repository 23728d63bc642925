"""FRLoRA: LoRA starts from the top-r SVD of each frozen weight, taken out of it; every round the server merges the
change of the averaged product into the frozen weight and every client restarts from that SVD start.

Expectations come another way than the code: the SVD of the dense weight, the averages by plain loops, the merged
model formed densely, and in a run the model's own parameters at each client's first step and its frozen weights
after each round."""

from __future__ import annotations

import pytest
import torch

from lorafair.aggregation import ClientUpdate, build_aggregator, svd_start
from lorafair.config import ConfigError
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.flower.strategy import strategy_refusal
from tests.helpers import Spy, parse_fit_args, tiny_args, tiny_config

SHAPES = {"blocks.0.attn.proj": (12, 10), "blocks.0.mlp.fc2": (12, 17), "blocks.1.attn.proj": (12, 10)}
RANK = 3
WEIGHTS = (3.0, 1.0, 6.0, 2.5)


def test_the_start_is_the_top_singular_part_of_the_weight_shared_evenly_by_the_factors():
    weight = torch.randn(12, 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scaling = 16.0 / RANK
    A0, B0 = svd_start(weight, RANK, scaling)
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    top = U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK]  # the best rank-r approximation, dense
    torch.testing.assert_close(scaling * B0 @ A0, top, rtol=0, atol=1e-12)
    # both factors carry sqrt(S / s): B0^T B0 = A0 A0^T = diag(S_r / s)
    torch.testing.assert_close(B0.T @ B0, torch.diag(S[:RANK] / scaling), rtol=0, atol=1e-12)
    torch.testing.assert_close(A0 @ A0.T, torch.diag(S[:RANK] / scaling), rtol=0, atol=1e-12)
    residual = weight - scaling * B0 @ A0  # what stays frozen: the weight without its top r directions
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:-RANK], S[RANK:], rtol=0, atol=1e-12)


def test_the_server_merges_the_change_of_the_averaged_product_and_sends_the_start_back():
    generator = torch.Generator().manual_seed(1)
    start = ClientUpdate(1.0, {name: (torch.randn(RANK, fan_in, generator=generator, dtype=torch.float64),
                                      torch.randn(fan_out, RANK, generator=generator, dtype=torch.float64))
                               for name, (fan_out, fan_in) in SHAPES.items()})
    updates = [ClientUpdate(weight, {name: (A + torch.randn(*A.shape, generator=generator, dtype=torch.float64),
                                            B + torch.randn(*B.shape, generator=generator, dtype=torch.float64))
                                     for name, (A, B) in start.lora.items()})
               for weight in WEIGHTS]
    out = build_aggregator("frlora").aggregate(updates, like=start)
    total = sum(WEIGHTS)
    for name, (A0, B0) in start.lora.items():
        A_bar = sum(u.weight / total * u.lora[name][0] for u in updates)
        B_bar = sum(u.weight / total * u.lora[name][1] for u in updates)
        assert torch.equal(out.lora[name][0], A0) and torch.equal(out.lora[name][1], B0)
        A_m, B_m = out.merge[name]
        assert A_m.shape[0] == B_m.shape[1] == 2 * RANK
        torch.testing.assert_close(B_m @ A_m, B_bar @ A_bar - B0 @ A0, rtol=0, atol=1e-12)
    merge_values = sum(2 * RANK * (fan_in + fan_out) for fan_out, fan_in in SHAPES.values())
    assert out.bytes_up == merge_values // 2 * 8  # A and B up; the merge's factors down, no pair
    assert out.bytes_down == merge_values * 8


def test_frlora_is_refused_at_mixed_ranks_and_in_lora_strategy(tmp_path):
    with pytest.raises(ConfigError, match=r"^lora\.client_ranks: frlora takes no clients of different ranks"):
        parse_fit_args(tiny_args(tmp_path, "--server.method", "frlora", "--lora.client_ranks", "[2, 4]"))
    # lorafair flower sends the start as the first merge (tests/flower/test_app_starts.py); LoraStrategy does not
    assert strategy_refusal("frlora") == ("frlora cannot run in LoraStrategy: its LoRA starts from the SVD of the "
                                          "frozen weights, taken out of them on every node before round 1, which the "
                                          "strategy does not send; run it with lorafair flower (lorafair's own "
                                          "ServerApp and ClientApp) or lorafair fit")


def test_in_a_run_the_frozen_weight_plus_the_start_is_the_merged_model_of_each_round(tmp_path):
    """Before round 1 the frozen weight plus s B0 A0 is the pretrained weight, and s B0 A0 its top-r SVD part; every
    client starts every round from (A0, B0); after each round the frozen weight plus s B0 A0 is the model the
    clients' averaged pair makes on the frozen weight before the round, W + s B_bar A_bar, formed densely."""
    cfg = tiny_config(tmp_path, "--server.method", "frlora")
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    scaling = trainer.model.scaling
    start = trainer.initial_state.lora
    spy = Spy(trainer)
    frozen = spy.bases
    for name, (A0, B0) in start.items():
        pretrained = frozen[0][name].double() + scaling * B0.double() @ A0.double()
        U, S, Vh = torch.linalg.svd(pretrained, full_matrices=False)
        top = U[:, :cfg.lora.r] @ torch.diag(S[:cfg.lora.r]) @ Vh[:cfg.lora.r]
        torch.testing.assert_close(scaling * B0.double() @ A0.double(), top, rtol=1e-5, atol=1e-6)

    results = trainer.run()

    for round_index, record in enumerate(results["rounds"], start=1):
        clients = record["clients"]
        for client in clients:
            for name, (A, B) in spy.start[round_index, client].items():
                assert torch.equal(A, start[name][0]) and torch.equal(B, start[name][1]), (round_index, client)
        total = sum(spy.weights[c] for c in clients)
        for name, (A0, B0) in start.items():
            A_bar = sum(spy.weights[c] / total * spy.end[round_index, c][name][0].double() for c in clients)
            B_bar = sum(spy.weights[c] / total * spy.end[round_index, c][name][1].double() for c in clients)
            merged = frozen[round_index - 1][name].double() + scaling * B_bar @ A_bar
            now = frozen[round_index][name].double() + scaling * B0.double() @ A0.double()
            torch.testing.assert_close(now, merged, rtol=1e-5, atol=1e-6)
            assert not torch.equal(frozen[round_index][name], frozen[round_index - 1][name])
    for name, (A0, B0) in trainer.global_state.lora.items():  # the adapters are back at the start
        assert torch.equal(A0, start[name][0]) and torch.equal(B0, start[name][1])

