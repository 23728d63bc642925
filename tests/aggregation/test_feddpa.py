"""FedDPA: the server averages the global pairs only; the client trains its local adapter with the global one fixed,
then the global one with the local one fixed; its own model mixes the two per input by similarity.

Expectations come another way than the code: weighted means by plain loops; the mixed model as a plain model whose
frozen weights hold the mix merged in by hand (W0 + s ((1 - alpha) B A + alpha B_l A_l)); alpha from cosines to each
training input taken one by one on a model with the local adapter merged in."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import ConcatDataset, Subset

from lorafair.aggregation import ClientUpdate, LocalAdapter, build_aggregator
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.federated.state import GlobalState
from lorafair.flower.strategy import strategy_refusal
from lorafair.keys import LOCAL, LOCAL_FEATURES, unpack_pairs
from tests.helpers import tiny_config

SHAPES = {"blocks.0.attn.proj": (6, 5), "blocks.0.mlp.fc2": (6, 9), "blocks.1.attn.proj": (6, 5)}
RANK = 2
WEIGHTS = (3.0, 1.0, 6.0)


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def test_the_server_averages_the_global_pairs_and_the_head_by_sample_count_and_nothing_else():
    generator = torch.Generator().manual_seed(0)
    updates = [ClientUpdate(w, {n: (randn(generator, RANK, i), randn(generator, o, RANK)) for n, (o, i) in
                                SHAPES.items()}, {"head.weight": randn(generator, 3, 4)}) for w in WEIGHTS]
    out = build_aggregator("feddpa").aggregate(updates)
    total = sum(WEIGHTS)
    for name in SHAPES:
        for position in (0, 1):
            by_hand = torch.zeros_like(updates[0].lora[name][position])
            for update in updates:
                by_hand += update.weight / total * update.lora[name][position]
            torch.testing.assert_close(out.lora[name][position], by_hand, rtol=0, atol=1e-12)
    assert out.merge is None
    pairs = sum(a.numel() + b.numel() for a, b in updates[0].lora.values())
    assert out.bytes_up == out.bytes_down == (pairs + 12) * 8  # the global pairs and the head, nothing local


def test_the_rule_trains_and_uploads_the_global_pair_and_gives_every_client_a_local_adapter():
    rule = build_aggregator("feddpa", shared_weight=0.3, similarity_scale=0.8, instances=7).client_rule(4)
    assert (rule.trains, rule.sends, rule.keeps, rule.personal) == ("AB", "AB", "", True)
    assert rule.local == LocalAdapter(shared_weight=0.3, similarity_scale=0.8, instances=7)
    with pytest.raises(ValueError, match="shared_weight must be a number in"):
        build_aggregator("feddpa", shared_weight=1.5)
    with pytest.raises(ValueError, match="instances must be an integer >= 1"):
        build_aggregator("feddpa", instances=0)
    refusal = strategy_refusal("feddpa")
    assert refusal.startswith("feddpa cannot run in LoraStrategy: its clients train a local adapter") and \
        "run it with lorafair flower" in refusal


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> FederatedTrainer:
    cfg = tiny_config(tmp_path_factory.mktemp("feddpa"), "--server.method", "feddpa")
    return FederatedTrainer(cfg, launch_fabric(cfg))


def random_pairs(model, generator: torch.Generator) -> dict:
    return {name: (0.3 * torch.randn(a.shape, generator=generator), 0.3 * torch.randn(b.shape, generator=generator))
            for name, (a, b) in model.get_lora().items()}


def plain_logits(model, base: dict, merged: dict, images: torch.Tensor) -> torch.Tensor:
    """The model with no LoRA at all (B = 0, no local adapter) and s * (sum of the given products) merged into its
    frozen weights by hand."""
    model.load_base_state(base)
    model.set_local_lora(None)
    model.set_lora({name: (a, torch.zeros_like(b)) for name, (a, b) in model.get_lora().items()})
    layers = dict(zip(model.layer_names, model._layers(), strict=True))
    with torch.no_grad():
        for name, product in merged.items():
            layers[name].base_layer.weight += model.scaling * product
        return model(images)


def features_by_hand(model, base: dict, local: dict, images: torch.Tensor) -> torch.Tensor:
    model.load_base_state(base)
    model.set_local_lora(None)
    model.set_lora({name: (a, torch.zeros_like(b)) for name, (a, b) in model.get_lora().items()})
    layers = dict(zip(model.layer_names, model._layers(), strict=True))
    with torch.no_grad():
        for name, (a, b) in local.items():
            layers[name].base_layer.weight += model.scaling * b @ a
        return model.backbone.forward_head(model.backbone.forward_features(images), pre_logits=True)


@pytest.mark.parametrize("scale", [0.9, 0.35])
def test_a_clients_own_model_gives_its_local_adapter_the_weight_of_its_similarity_and_the_global_one_the_rest(
        trainer, scale):
    """alpha(x) = scale * mean_j cos(e(x), e(x_j)) goes to the local adapter, 1 - alpha(x) to the global one: the
    mixed model's logits equal, input by input, the plain model with (1 - alpha) B A + alpha B_l A_l merged in by
    hand, and not the swapped mix. The first test input is also a training input, so its alpha is the largest."""
    model, client = trainer.model, trainer.client
    generator = torch.Generator().manual_seed(1)
    base = model.base_state()
    shared, local = random_pairs(model, generator), random_pairs(model, generator)
    train_images = torch.stack([trainer.data.clients[0].dataset[i][0] for i in range(4)])
    test_images = torch.cat([train_images[:1], torch.stack([trainer.data.test["rotated"][i][0] for i in range(2)])])
    model.eval()

    reference = features_by_hand(model, base, local, train_images)
    tested = features_by_hand(model, base, local, test_images)
    alpha = torch.tensor([scale * sum(torch.cosine_similarity(t, r, dim=0).item() for r in reference) / 4
                          for t in tested])
    summary = torch.nn.functional.normalize(reference, dim=-1).mean(0)
    model.load_base_state(base)
    model.set_lora(shared)
    model.set_local_lora(local)
    with torch.no_grad():
        weight = client.local_weights(test_images, summary, LocalAdapter(similarity_scale=scale))
        torch.testing.assert_close(weight, alpha, rtol=0, atol=1e-5)
        assert weight[0] == weight.max() and weight[0] == pytest.approx(scale * 0.25 * (1 + sum(
            torch.cosine_similarity(reference[0], r, dim=0).item() for r in reference[1:])), abs=1e-5)
        model.mix_adapters(1.0 - weight, weight)
        mixed = model(test_images)
        model.mix_adapters(1.0, 0.0)
        plain_by_shared = model(test_images)  # the mix switched off: the global pair alone

    # the evaluation of a client's own model gives the local adapter that weight, the global one the rest
    state = GlobalState(shared, trainer.global_state.extra, local={
        **{f"{LOCAL}/{n}/{f}": pair["AB".index(f)] for n, pair in local.items() for f in "AB"},
        LOCAL_FEATURES: summary})
    mixes, mix = [], model.mix_adapters
    model.mix_adapters = lambda shared_weight, local_weight: (mixes.append((shared_weight, local_weight)),
                                                              mix(shared_weight, local_weight))
    try:
        tests = ConcatDataset([Subset(trainer.data.clients[0].dataset, [0]), Subset(trainer.data.test["rotated"],
                                                                                   [0, 1])])
        client.evaluation_sums(state, [tests], (0, 1), None, LocalAdapter(similarity_scale=scale))
    finally:
        del model.mix_adapters
    (shared_weight, local_weight), = [pair for pair in mixes if isinstance(pair[1], torch.Tensor)]
    torch.testing.assert_close(local_weight, alpha, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared_weight, 1 - alpha, rtol=0, atol=1e-5)
    assert mixes[-1] == (1.0, 0.0)

    for row, a in enumerate(alpha.tolist()):
        by_hand = plain_logits(model, base, {n: (1 - a) * shared[n][1] @ shared[n][0] + a * local[n][1] @ local[n][0]
                                             for n in shared}, test_images[row:row + 1])
        swapped = plain_logits(model, base, {n: a * shared[n][1] @ shared[n][0] + (1 - a) * local[n][1] @ local[n][0]
                                             for n in shared}, test_images[row:row + 1])
        torch.testing.assert_close(mixed[row:row + 1], by_hand, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(mixed[row:row + 1], swapped, rtol=1e-4, atol=1e-5)
    only_shared = plain_logits(model, base, {n: shared[n][1] @ shared[n][0] for n in shared}, test_images)
    torch.testing.assert_close(plain_by_shared, only_shared, rtol=1e-4, atol=1e-5)
    model.load_base_state(base)


def test_the_local_phase_trains_the_local_adapter_alone_and_the_global_phase_the_global_pair_alone(trainer):
    """At the start of each phase (each optimizer) the trainable parameters are exactly the local adapter, then the
    global pair and the head; the global pair gets no gradient and does not move while the local adapter trains,
    which then stays as it was while the global pair trains; the client returns that local adapter and the mean of
    its normalised training features."""
    model, client = trainer.model, trainer.client
    generator = torch.Generator().manual_seed(2)
    start_shared, start_local = random_pairs(model, generator), random_pairs(model, generator)
    start = trainer.global_state.overlaid({}, 4)
    start.lora = start_shared
    start.local = {f"{LOCAL}/{n}/{f}": pair["AB".index(f)] for n, pair in start_local.items() for f in "AB"}
    layers = model._layers()
    global_factors = [p for layer in layers for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    head = [p for name, p in model.backbone.named_parameters() if name in model._head_names]
    seen = []
    configure = model.configure_optimizers

    def configuring():
        seen.append((model.get_lora(), model.get_local_lora(), {id(p) for p in model.parameters() if p.requires_grad},
                     [p.grad is None for p in global_factors]))
        for p in global_factors:
            p.grad = None
        return configure()

    model.configure_optimizers = configuring
    try:
        result = client.train(trainer.data.clients[1], start, 1, factors="AB", local=LocalAdapter())
    finally:
        del model.configure_optimizers
    (shared_1, local_1, trainable_1, _), (shared_2, local_2, trainable_2, no_grad_2) = seen
    assert trainable_1 == {id(p) for p in model.local_factors}
    assert trainable_2 == {id(p) for p in global_factors + head}
    assert all(no_grad_2)  # the local phase sent no gradient into the global pair
    for name in start_shared:
        assert all(torch.equal(shared_1[name][i], start_shared[name][i].float()) for i in (0, 1))
        assert all(torch.equal(shared_2[name][i], shared_1[name][i]) for i in (0, 1))  # fixed in the local phase
        assert not torch.equal(local_2[name][0], local_1[name][0])  # the local adapter trained
        kept = unpack_pairs(result.local, LOCAL)[name]
        assert all(torch.equal(kept[i], local_2[name][i]) for i in (0, 1))  # then stayed fixed
        assert not torch.equal(result.update.lora[name][1], shared_2[name][1])  # the global pair trained
    assert result.local[LOCAL_FEATURES].shape == (model.backbone.num_features,)
    assert result.local[LOCAL_FEATURES].norm() <= 1 + 1e-6

