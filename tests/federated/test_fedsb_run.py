"""Fed-SB in `lorafair fit`: the start cut from the clients' mean gradient, clients that train only the core R of
A = R A0 with B frozen, each round's answer the mean of that round's clients, r^2 numbers a layer on the wire, and a
resumed run that repeats the uninterrupted one.

Expectations come another way than the code: the gradient by one autograd call over every client's batches at once,
its rank-r cut from an eigendecomposition, and the model's own parameters at each client's first step and after."""

from __future__ import annotations

import json

import pytest
import torch

from lorafair.aggregation import core_of
from lorafair.data import make_loader
from lorafair.federated.checkpoints import load_checkpoint
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.fit import fit
from lorafair.seeds import derive_seed
from tests.helpers import SEVERAL_PROCESSES, Spy, run_on_two_ranks, tiny_args, tiny_config

BATCHES = 2


def _mean_gradient(trainer: FederatedTrainer) -> dict[str, torch.Tensor]:
    """The sample-weighted mean over every client of its mean loss gradient at the frozen weights of the pretrained
    model (LoRA B = 0), on the first BATCHES batches each client draws, by one autograd call."""
    cfg, model = trainer.cfg, trainer.model
    model.set_lora({name: (A, torch.zeros_like(B)) for name, (A, B) in trainer.initial_state.lora.items()})
    model.set_extra(trainer.initial_state.extra)
    model.train()
    weights = model.frozen_weights()
    clients = trainer.data.clients
    total = sum(client.num_samples for client in clients)
    for weight in weights.values():
        weight.requires_grad_(True)
    loss = 0
    for client in clients:
        loader = make_loader(client.dataset, cfg.data.batch_size, shuffle=True,
                             seed=derive_seed("gradient", cfg.seed, client.id), num_workers=0)
        batches = [batch for _, batch in zip(range(BATCHES), loader, strict=False)]
        mean_loss = sum(model.training_step(batch, 0) for batch in batches) / len(batches)
        loss = loss + client.num_samples / total * mean_loss
    gradients = torch.autograd.grad(loss, list(weights.values()))
    for weight in weights.values():
        weight.requires_grad_(False)
    return {name: gradient.double() for name, gradient in zip(weights, gradients, strict=True)}


def test_a_run_starts_from_the_cut_gradient_trains_only_the_cores_and_averages_each_round_alone(tmp_path):
    cfg = tiny_config(tmp_path, "--server.method", "fed_sb", "--server.init_batches", str(BATCHES))
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    scaling, rank, start = trainer.model.scaling, cfg.lora.r, trainer.initial_state.lora
    with torch.enable_grad():
        gradient = _mean_gradient(trainer)
    for name, (A, B) in start.items():
        step = -cfg.client.lr * gradient[name]
        top = torch.linalg.eigh(step @ step.T).eigenvectors[:, -rank:]
        expected = top @ top.T @ step  # the best rank-r approximation of the first SGD step
        torch.testing.assert_close(scaling * B.double() @ A.double(), expected, rtol=1e-4,
                                   atol=1e-4 * float(expected.abs().max()))
        basis = trainer.basis[name]
        torch.testing.assert_close(basis @ basis.T, torch.eye(rank), rtol=0, atol=1e-5)
    trainer.model.train_factors("A")
    with trainer.model.core_only(trainer.basis):  # what any optimizer is given: R, r x r, in A's place
        shapes = [p.shape for n, p in trainer.model.named_parameters() if "lora_" in n and p.requires_grad]
    assert shapes == [(rank, rank)] * len(start)
    spy = Spy(trainer)

    results = trainer.run()

    heads = sum(tensor.numel() * 4 for tensor in trainer.global_state.extra.values())
    on_the_wire = len(start) * rank * rank * 4 + heads  # R up and down, never the r x in A
    for round_index, record in enumerate(results["rounds"], start=1):
        assert record["bytes_up"] == record["bytes_down"] == on_the_wire
        clients = record["clients"]
        served = spy.states[round_index - 1].lora if round_index > 1 else start
        for client in clients:
            for name, (A, B) in spy.end[round_index, client].items():
                A_start, B_start = spy.start[round_index, client][name]
                # A as R A0 with R = A A0^T: the served A up to float32 rounding
                torch.testing.assert_close(A_start, served[name][0], rtol=1e-5, atol=1e-8)
                assert torch.equal(B_start, served[name][1])
                assert torch.equal(B, start[name][1])  # B0, bit for bit, every round
                assert not torch.allclose(A, A_start)  # the core trained
                basis = trainer.basis[name]
                torch.testing.assert_close(core_of(A, basis) @ basis, A, rtol=0, atol=1e-6)  # A stays R A0
        total = sum(spy.weights[c] for c in clients)
        for name, (A, B) in spy.answers[round_index].items():  # this round's clients only
            mean = sum(spy.weights[c] / total * spy.end[round_index, c][name][0].double() for c in clients)
            torch.testing.assert_close(A.double(), mean, rtol=0, atol=1e-6)
            assert torch.equal(B, start[name][1])


@pytest.mark.slow
@SEVERAL_PROCESSES
def test_two_ranks_take_the_same_start_and_rounds_as_one_process(tmp_path):
    """Each rank takes the gradient of the clients it hosts and the ranks sum their shares: the start, and so every
    round, match one process up to float summation order."""
    single = fit(tiny_config(tmp_path / "one", "--server.method", "fed_sb"))
    run_on_two_ranks(tiny_args(tmp_path / "two", "--server.method", "fed_sb"))
    distributed = json.loads((tmp_path / "two" / "results.json").read_text())
    for domain, accuracy in single["final"]["accuracy"].items():
        assert abs(distributed["final"]["accuracy"][domain] - accuracy) <= 0.005
    ours, theirs = (load_checkpoint(tmp_path / run / "checkpoints" / "round_00002.ckpt")["lora"]
                    for run in ("two", "one"))
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=1e-4, atol=1e-6)
