"""Loading backbone weights: local files in every supported format, errors that name the problem, the shipped asset."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file
from timm.models.mlp_mixer import MlpMixer

from lorafair import weights
from lorafair.config import ModelConfig
from lorafair.errors import UserError
from lorafair.weights import create_backbone
from tests.helpers import ROOT

VIT_KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32}
MIXER_KWARGS = {"img_size": 32, "patch_size": 8, "num_blocks": 2, "embed_dim": 64}
ASSETS = ROOT / "lorafair" / "assets"


def tiny_vit(num_classes: int = 7, **overrides) -> torch.nn.Module:
    return timm.create_model("vit_base_patch16_224", num_classes=num_classes, **{**VIT_KWARGS, **overrides})


def vit_config(path: Path | None = None, **overrides) -> ModelConfig:
    return ModelConfig(name="vit_base_patch16_224", weights=path, kwargs={**VIT_KWARGS, **overrides})


def assert_same_backbone(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    source_state = source.state_dict()
    for name, tensor in loaded.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(tensor, source_state[name], rtol=0, atol=0, msg=name)


def test_safetensors_loads_everything_but_the_head(tmp_path):
    source = tiny_vit(num_classes=7)
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), path)
    loaded = create_backbone(vit_config(path), num_classes=3)
    assert_same_backbone(loaded, source)
    assert loaded.head.weight.shape == (3, 64)
    same_classes = create_backbone(vit_config(path), num_classes=7)  # a fitting head is still not taken
    assert not torch.equal(same_classes.head.weight, source.head.weight)


@pytest.mark.parametrize("wrap", [False, True])
def test_torch_state_dict_files_load(tmp_path, wrap):
    source = tiny_vit()
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3} if wrap else source.state_dict(), path)
    assert_same_backbone(create_backbone(vit_config(path), num_classes=3), source)


def test_a_file_of_another_width_names_the_first_mismatched_tensor(tmp_path):
    source = tiny_vit(embed_dim=32)
    path = tmp_path / "narrow.safetensors"
    save_file(source.state_dict(), path)
    model_state = tiny_vit().state_dict()
    first = next(name for name, tensor in model_state.items() if source.state_dict()[name].shape != tensor.shape)
    with pytest.raises(UserError, match=rf"tensor {first} .* has shape \(1, 1, 32\) but the model needs \(1, 1, 64\)"):
        create_backbone(vit_config(path), num_classes=3)


def test_files_of_other_depths_are_refused(tmp_path):
    shallow, deep = tmp_path / "shallow.safetensors", tmp_path / "deep.safetensors"
    save_file(tiny_vit(depth=1).state_dict(), shallow)
    save_file(tiny_vit(depth=3).state_dict(), deep)
    with pytest.raises(UserError, match=r"has no tensor blocks\.1\."):
        create_backbone(vit_config(shallow), num_classes=3)
    with pytest.raises(UserError, match=r"tensors the model lacks, e\.g\. blocks\.2\."):
        create_backbone(vit_config(deep), num_classes=3)


def test_missing_and_unreadable_files_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"file not found.*huggingface-cli download timm/vit_base_patch16_224"):
        create_backbone(vit_config(tmp_path / "nope.safetensors"), num_classes=3)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a weight file")
    with pytest.raises(UserError, match="cannot read"):
        create_backbone(vit_config(garbage), num_classes=3)


def test_pretrained_without_network_fails_fast_and_points_to_model_weights(tmp_path, monkeypatch):
    """The real probe runs; only its connection is replaced by one that times out, as behind a firewall that drops
    packets. It must try once, with a short timeout, and then fail without the hub client's minute of retries."""
    attempts = []

    def dropped(address, timeout=None):
        attempts.append((address, timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(weights.socket, "create_connection", dropped)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"no model hub is reachable.*use model\.weights"):
        create_backbone(ModelConfig(name="vit_tiny_patch16_224.augreg_in21k", pretrained=True), num_classes=3)
    assert time.perf_counter() - start < 30, "must not wait on network retries"
    assert len(attempts) == 1 and attempts[0][0][1] == 443 and 0 < attempts[0][1] <= 5
    assert hub_constants.HF_HUB_OFFLINE is False


def test_model_name_errors():
    with pytest.raises(UserError, match="unknown timm model"):
        create_backbone(ModelConfig(name="vit_nonexistent"), num_classes=3)
    with pytest.raises(UserError, match=r"use model\.name mlp_mixer"):
        create_backbone(ModelConfig(name="mixer_s32_224", kwargs={"num_blocks": 2}), num_classes=3)
    with pytest.raises(UserError, match="no hub weights"):
        create_backbone(ModelConfig(name="mlp_mixer", pretrained=True), num_classes=3)


def vit_to_npz(model: torch.nn.Module, path: Path) -> None:
    """Write a timm ViT in the layout of the original JAX releases (kernels in x out, heads split)."""
    heads, width = model.blocks[0].attn.num_heads, model.embed_dim
    arrays = {"embedding/kernel": model.patch_embed.proj.weight.permute(2, 3, 1, 0),
              "embedding/bias": model.patch_embed.proj.bias, "cls": model.cls_token,
              "Transformer/posembed_input/pos_embedding": model.pos_embed,
              "Transformer/encoder_norm/scale": model.norm.weight, "Transformer/encoder_norm/bias": model.norm.bias,
              "head/kernel": model.head.weight.T, "head/bias": model.head.bias}
    for i, block in enumerate(model.blocks):
        prefix = f"Transformer/encoderblock_{i}/"
        attention = f"{prefix}MultiHeadDotProductAttention_1/"
        for norm, scope in ((block.norm1, "LayerNorm_0"), (block.norm2, "LayerNorm_2")):
            arrays[f"{prefix}{scope}/scale"], arrays[f"{prefix}{scope}/bias"] = norm.weight, norm.bias
        for part, weight, bias in zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3),
                                      block.attn.qkv.bias.chunk(3), strict=True):
            arrays[f"{attention}{part}/kernel"] = weight.T.reshape(width, heads, -1)
            arrays[f"{attention}{part}/bias"] = bias.reshape(heads, -1)
        arrays[f"{attention}out/kernel"] = block.attn.proj.weight.reshape(width, heads, -1).permute(1, 2, 0)
        arrays[f"{attention}out/bias"] = block.attn.proj.bias
        for j, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            arrays[f"{prefix}MlpBlock_3/Dense_{j}/kernel"] = fc.weight.T
            arrays[f"{prefix}MlpBlock_3/Dense_{j}/bias"] = fc.bias
    np.savez(path, **{name: tensor.detach().numpy() for name, tensor in arrays.items()})


def mixer_to_npz(model: MlpMixer, path: Path) -> None:
    """Write a timm MlpMixer under the Flax names of the original Mixer releases."""
    scopes = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_1", "mlp_tokens.fc1": "token_mixing/Dense_0",
              "mlp_tokens.fc2": "token_mixing/Dense_1", "mlp_channels.fc1": "channel_mixing/Dense_0",
              "mlp_channels.fc2": "channel_mixing/Dense_1", "norm": "pre_head_layer_norm", "head": "head"}
    arrays = {"stem/kernel": model.stem.proj.weight.permute(2, 3, 1, 0), "stem/bias": model.stem.proj.bias}
    for name, tensor in model.state_dict().items():
        module, param = name.rsplit(".", 1)
        if module.startswith("stem"):
            continue
        block = ""
        if module.startswith("blocks."):
            _, index, module = module.split(".", 2)
            block = f"MixerBlock_{index}/"
        leaf = {"weight": "kernel" if tensor.ndim == 2 else "scale", "bias": "bias"}[param]
        arrays[f"{block}{scopes[module]}/{leaf}"] = tensor.T if tensor.ndim == 2 else tensor
    np.savez(path, **{name: tensor.detach().numpy() for name, tensor in arrays.items()})


def test_original_vit_npz_loads_through_timm(tmp_path):
    source = tiny_vit()
    path = tmp_path / "ViT-tiny.npz"
    vit_to_npz(source, path)
    assert_same_backbone(create_backbone(vit_config(path), num_classes=3), source)
    with pytest.raises(UserError, match=r"embedding/kernel .* has width 64 but the model's embed_dim is 32"):
        create_backbone(vit_config(path, embed_dim=32), num_classes=3)
    with pytest.raises(UserError, match="has 2 encoder blocks but the model has 3"):
        create_backbone(vit_config(path, depth=3), num_classes=3)


def test_original_mixer_npz_is_renamed_to_timm(tmp_path):
    torch.manual_seed(0)
    source = MlpMixer(num_classes=7, **MIXER_KWARGS)
    path = tmp_path / "Mixer-tiny.npz"
    mixer_to_npz(source, path)
    loaded = create_backbone(ModelConfig(name="mlp_mixer", weights=path, kwargs=MIXER_KWARGS), num_classes=3)
    assert_same_backbone(loaded, source)
    with pytest.raises(UserError, match=r"tensor stem\.proj\.weight .* has shape"):
        create_backbone(ModelConfig(name="mlp_mixer", weights=path, kwargs={**MIXER_KWARGS, "embed_dim": 32}),
                        num_classes=3)


def test_shipped_demo_backbone_recognises_its_pretraining_digits():
    from lorafair.data.digits import pretraining_set

    record = json.loads((ASSETS / "demo_vit.json").read_text())
    path = ASSETS / "demo_vit.safetensors"
    assert path.stat().st_size < 5 * 2**20
    model = create_backbone(ModelConfig(name=record["model_name"], weights=path, kwargs=record["kwargs"]),
                            num_classes=record["num_classes"]).eval()
    file_state = load_file(path)
    model.head.load_state_dict({"weight": file_state["head.weight"], "bias": file_state["head.bias"]})
    images, labels = pretraining_set(image_size=record["kwargs"]["img_size"])
    mean = torch.tensor(record["normalisation"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(record["normalisation"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        accuracy = (model((images - mean) / std).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.5, f"chance is 0.1, got {accuracy:.3f}"
    assert accuracy == pytest.approx(record["train_accuracy"], abs=0.02)


def test_relative_asset_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = Path("lorafair/assets/demo_vit.safetensors")
    assert weights.resolve_weights_path(relative) == ASSETS / "demo_vit.safetensors"
    (tmp_path / "lorafair" / "assets").mkdir(parents=True)
    (tmp_path / relative).write_bytes(b"")  # a file in the working directory wins
    assert weights.resolve_weights_path(relative) == relative
    assert weights.resolve_weights_path(Path("elsewhere.safetensors")) == Path("elsewhere.safetensors")
