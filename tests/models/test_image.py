"""The client model: which layers LoRA adapts, what trains, state round trips, merges and seeded init."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer

from lorafair.config import ClientConfig, LoraConfig, ModelConfig
from lorafair.data.transforms import backbone_data_config
from lorafair.errors import UserError
from lorafair.models.image import LoraClassifier

NUM_CLASSES = 5
TINY_VIT = ModelConfig(name="vit_base_patch16_224", kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2,
                                                            "img_size": 32})
TINY_MIXER = ModelConfig(name="mlp_mixer", kwargs={"img_size": 32, "patch_size": 8, "num_blocks": 2, "embed_dim": 64})
EXPECTED_LAYERS = {
    "vit": ["blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.attn.proj", "blocks.1.mlp.fc2"],
    "mixer": ["blocks.0.mlp_tokens.fc2", "blocks.0.mlp_channels.fc2", "blocks.1.mlp_tokens.fc2",
              "blocks.1.mlp_channels.fc2"],
}
MODELS = {"vit": TINY_VIT, "mixer": TINY_MIXER}


def build(family: str = "vit", seed: int = 0, **lora) -> LoraClassifier:
    torch.manual_seed(seed)
    lora_cfg = LoraConfig(**{"r": 4, "alpha": 8.0, **lora})
    return LoraClassifier(MODELS[family], lora_cfg, NUM_CLASSES, ClientConfig(lr=0.1)).eval()


def random_lora(model: LoraClassifier, generator: torch.Generator, rank: int | None = None) -> dict:
    lora = {}
    for name, (lora_a, lora_b) in model.get_lora().items():
        r = rank or lora_a.shape[0]
        lora[name] = (torch.randn(r, lora_a.shape[1], generator=generator),
                      torch.randn(lora_b.shape[0], r, generator=generator) * 0.1)
    return lora


def dense_reference(model: LoraClassifier, *updates: dict) -> torch.nn.Module:
    """A plain timm model holding the client's weights with W0 + scaling * B @ A of every update folded in."""
    if isinstance(model.backbone, MlpMixer):
        reference = MlpMixer(num_classes=NUM_CLASSES, **TINY_MIXER.kwargs)
    else:
        reference = timm.create_model(TINY_VIT.name, num_classes=NUM_CLASSES, **TINY_VIT.kwargs)
    state = {name.replace(".base_layer.", "."): tensor for name, tensor in model.backbone.state_dict().items()
             if ".lora_" not in name}
    for update in updates:
        for name, (lora_a, lora_b) in update.items():
            state[f"{name}.weight"] = state[f"{name}.weight"] + model.scaling * lora_b @ lora_a
    reference.load_state_dict(state)
    return reference.eval()


@pytest.mark.parametrize("family", ["vit", "mixer"])
def test_default_targets_hit_the_block_outputs_only(family):
    model = build(family)
    assert model.layer_names == EXPECTED_LAYERS[family]
    adapted = [name for name, module in model.backbone.named_modules() if hasattr(module, "lora_A")]
    assert adapted == EXPECTED_LAYERS[family]
    assert not any(name.startswith(("patch_embed", "stem")) for name in adapted)


@pytest.mark.parametrize("family", ["vit", "mixer"])
def test_only_lora_factors_and_head_train(family):
    model = build(family)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    expected = {f"backbone.{layer}.lora_{factor}.default.weight" for layer in model.layer_names for factor in "AB"}
    assert trainable == expected | {"backbone.head.weight", "backbone.head.bias"}
    assert set(model.get_extra()) == {"head.weight", "head.bias"}


def test_custom_regex_and_its_errors():
    assert build(target_modules=r".*attn\.qkv").layer_names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    with pytest.raises(UserError, match=r"matches no Linear layer.*blocks\.0\.attn\.qkv"):
        build(target_modules=r"patch_embed\.proj")
    with pytest.raises(UserError, match="classifier head"):
        build(target_modules=r"head|.*fc2")
    with pytest.raises(UserError, match="not a valid regex"):
        build(target_modules=r"blocks.(")


def test_state_round_trips_and_copies():
    model = build()
    generator = torch.Generator().manual_seed(1)
    lora = random_lora(model, generator)
    extra = {name: torch.randn(tensor.shape, generator=generator) for name, tensor in model.get_extra().items()}
    model.set_lora(lora)
    model.set_extra(extra)
    got_lora, got_extra = model.get_lora(), model.get_extra()
    for name, (lora_a, lora_b) in lora.items():
        assert got_lora[name][0].shape == (4, lora_a.shape[1])
        torch.testing.assert_close(got_lora[name][0], lora_a)
        torch.testing.assert_close(got_lora[name][1], lora_b)
    for name, tensor in extra.items():
        torch.testing.assert_close(got_extra[name], tensor)
    got_lora[model.layer_names[0]][0].zero_()  # copies: editing them leaves the model alone
    got_extra["head.weight"].zero_()
    torch.testing.assert_close(model.get_lora()[model.layer_names[0]][0], lora[model.layer_names[0]][0])
    torch.testing.assert_close(model.get_extra()["head.weight"], extra["head.weight"])


@pytest.mark.parametrize("family", ["vit", "mixer"])
def test_forward_and_merge_equal_the_dense_reference(family):
    model = build(family)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    lora = random_lora(model, generator)
    model.set_lora(lora)
    with torch.no_grad():
        torch.testing.assert_close(model(images), dense_reference(model, lora)(images), rtol=1e-4, atol=1e-5)

    base_before = model.base_state()
    merge = random_lora(model, generator, rank=3 * 4)  # FLoRA merges stacks of rank K * r
    model.merge(merge)
    for name, (lora_a, lora_b) in merge.items():
        torch.testing.assert_close(model.base_state()[name], base_before[name] + model.scaling * lora_b @ lora_a)
    with torch.no_grad():
        expected = dense_reference(model, lora)(images)  # the reference reads the merged base weights
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)
        unmerged = dense_reference(model, lora, {n: (-a, b) for n, (a, b) in merge.items()})(images)
    model.load_base_state(base_before)
    with torch.no_grad():
        torch.testing.assert_close(model(images), unmerged, rtol=1e-4, atol=1e-5)


def test_init_lora_is_seeded_like_peft_and_starts_at_the_base_model():
    first, second = build(seed=0), build(seed=1)
    second.set_extra(first.get_extra())
    second.load_base_state(first.base_state())
    first.init_lora(torch.Generator().manual_seed(7))
    second.init_lora(torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    for name, (lora_a, lora_b) in first.get_lora().items():
        expected_a = torch.empty_like(lora_a)
        torch.nn.init.kaiming_uniform_(expected_a, a=math.sqrt(5), generator=generator)
        torch.testing.assert_close(lora_a, expected_a)
        assert lora_a.abs().max() <= 1 / math.sqrt(lora_a.shape[1])  # kaiming-uniform bound with a = sqrt(5)
        assert torch.count_nonzero(lora_b) == 0
        torch.testing.assert_close(second.get_lora()[name][0], lora_a)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(first(images), dense_reference(first)(images), rtol=1e-4, atol=1e-5)
    other = build(seed=0)
    other.init_lora(torch.Generator().manual_seed(8))
    assert not torch.equal(other.get_lora()["blocks.0.mlp.fc2"][0], first.get_lora()["blocks.0.mlp.fc2"][0])


@pytest.mark.parametrize("factors", ["B", "A"])
def test_train_factors_trains_only_those(factors):
    model = build().train()
    model.init_lora(torch.Generator().manual_seed(0))
    with torch.no_grad():  # B = 0 gives A no gradient: start from a nonzero B so that both factors could move
        model.set_lora({name: (a, torch.randn_like(b)) for name, (a, b) in model.get_lora().items()})
    model.train_factors(factors)
    frozen = "AB".replace(factors, "")
    layers = [model.backbone.get_submodule(n) for n in model.layer_names]
    assert not any(getattr(layer, f"lora_{frozen}")["default"].weight.requires_grad for layer in layers)
    before = model.get_lora()
    optimizer = model.configure_optimizers()
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    for _ in range(2):
        optimizer.zero_grad()
        model.training_step(batch, 0).backward()
        optimizer.step()
    kept, moved = "AB".index(frozen), "AB".index(factors)
    for name, pair in model.get_lora().items():
        torch.testing.assert_close(pair[kept], before[name][kept], rtol=0, atol=0)
        assert not torch.equal(pair[moved], before[name][moved])
    model.train_factors("AB")
    assert sum(p.numel() for g in model.configure_optimizers().param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_optimizer_follows_the_client_config():
    model = LoraClassifier(TINY_VIT, LoraConfig(r=2), NUM_CLASSES, ClientConfig(lr=0.3, momentum=0.5,
                                                                               weight_decay=0.01))
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.5, 0.01)
    assert len(group["params"]) == 2 * len(model.layer_names) + 2


@pytest.mark.parametrize("family", ["vit", "mixer"])
def test_data_config_has_the_built_input_size(family):
    config = backbone_data_config(build(family).backbone)
    assert config["input_size"] == (3, 32, 32)
    assert len(config["mean"]) == len(config["std"]) == 3


def test_validation_counts_a_hand_worked_case():
    """Head weights zero and the bias favouring class 2: every image is predicted 2, so the correct count is the
    number of labels equal to 2, whatever the images are."""
    model = build()
    model.set_extra({"head.weight": torch.zeros(NUM_CLASSES, 64), "head.bias": torch.eye(NUM_CLASSES)[2]})
    generator = torch.Generator().manual_seed(3)
    batches = [torch.tensor([2, 0, 2, 1, 4, 2]), torch.tensor([3, 3, 2]), torch.tensor([0, 1, 3, 4])]
    with torch.no_grad():
        counts = [model.validation_step((torch.randn(len(labels), 3, 32, 32, generator=generator), labels), i)
                  for i, labels in enumerate(batches)]
    assert [items.tolist() for (items,) in counts] == [[True, False, True, False, False, True],
                                                        [False, False, True], [False, False, False, False]]
    assert model.val_accuracy.compute().item() == pytest.approx(4 / 13)


def test_training_step_gives_gradients_to_trainable_tensors_only():
    model = build().train()
    model.set_lora(random_lora(model, torch.Generator().manual_seed(4)))
    loss = model.training_step((torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
