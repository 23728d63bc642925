"""The frozen backbone: a timm model whose pretrained weights come from a local file, the model hub, or nowhere.

A local file (`model.weights`) is checked tensor by tensor before it is loaded, so a file made for another
architecture stops with the name of the first tensor that does not fit instead of silently leaving layers random.
The classifier head is never taken from a file: every task trains its own.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import timm
import torch
from huggingface_hub import constants as hub_constants
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lorafair.config import ModelConfig
from lorafair.errors import UserError

MIXER_FROM_KWARGS = "mlp_mixer"
"""model.name that builds timm's MlpMixer class from model.kwargs alone: timm's mixer_* names fix their
architecture and reject overrides such as num_blocks or embed_dim, so small Mixers are made this way."""

_HOW_TO_GET_WEIGHTS = (
    "download the file on a machine with network, e.g. `huggingface-cli download timm/vit_base_patch16_224."
    "augreg_in21k model.safetensors` (or timm/mixer_b16_224.goog_in21k), copy it here and set model.weights to it"
)


def create_backbone(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The timm model of `model_cfg` with a fresh head of `num_classes` outputs.

    Weights come from `model.weights` when set (it takes precedence), else from the hub when `model.pretrained`,
    else the model stays randomly initialised.
    """
    if model_cfg.weights is not None:
        model = create_architecture(model_cfg, num_classes, pretrained=False)
        load_weights(model, resolve_weights_path(Path(model_cfg.weights)))
        return model
    if not model_cfg.pretrained:
        return create_architecture(model_cfg, num_classes, pretrained=False)
    if _hub_reachable():
        try:
            return create_architecture(model_cfg, num_classes, pretrained=True)
        except (OSError, RuntimeError) as err:  # download failures; RuntimeError: timm has no weights for the name
            raise UserError(f"model.pretrained: could not fetch the weights of {model_cfg.name} ({err}); "
                            f"{_HOW_TO_GET_WEIGHTS}") from err
    with _hub_offline():  # the hub's local cache may still hold the file; without network, fail at once
        try:
            return create_architecture(model_cfg, num_classes, pretrained=True)
        except OSError as err:
            raise UserError(f"model.pretrained: no model hub is reachable from this machine and {model_cfg.name} "
                            f"is not in the local cache; set model.pretrained false and use model.weights instead: "
                            f"{_HOW_TO_GET_WEIGHTS}") from err


def resolve_weights_path(path: Path) -> Path:
    """A relative path lorafair/... that is not in the working directory is looked up in the installed package
    (importlib.resources), so the shipped lorafair/assets/... files are found from any directory."""
    if path.is_absolute() or path.exists() or path.parts[:1] != ("lorafair",):
        return path
    shipped = Path(files("lorafair").joinpath(*path.parts[1:]))
    return shipped if shipped.exists() else path


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a .safetensors, .pth/.bin state dict or original JAX .npz file into `model`, keeping its head."""
    if not path.is_file():
        raise UserError(f"model.weights: file not found: {path}; {_HOW_TO_GET_WEIGHTS}")
    if path.suffix == ".npz" and not isinstance(model, MlpMixer):
        _load_vit_npz(model, path)
        return
    try:
        state = _mixer_state_from_npz(path) if path.suffix == ".npz" else timm.models.load_state_dict(str(path))
    except Exception as err:  # any parse failure of a user-supplied file
        raise UserError(f"model.weights: cannot read {path} as a weight file: {err}") from err
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)  # timm's own renaming
    if filter_fn is not None:
        state = filter_fn(state, model)
    head = set(head_parameter_names(model))
    state = {name: tensor for name, tensor in state.items() if name not in head}
    _check_fits(state, model, head, path)
    model.load_state_dict(state, strict=False)


def create_architecture(model_cfg: ModelConfig, num_classes: int, pretrained: bool = False) -> nn.Module:
    """The model of model.name and model.kwargs, with hub weights when `pretrained`; errors name the setting."""
    kwargs = dict(model_cfg.kwargs)
    if model_cfg.name == MIXER_FROM_KWARGS:
        if pretrained:
            raise UserError(f"model.pretrained: {MIXER_FROM_KWARGS} has no hub weights; use a timm name such as "
                            "mixer_b16_224.goog_in21k, or model.weights")
        return _call_with_kwargs(MlpMixer, model_cfg, num_classes=num_classes, **kwargs)
    if not timm.is_model(model_cfg.name):
        raise UserError(f"model.name: unknown timm model {model_cfg.name!r}; list them with "
                        f"timm.list_models('vit_*') or use {MIXER_FROM_KWARGS!r} for a Mixer built from model.kwargs")
    return _call_with_kwargs(timm.create_model, model_cfg, model_cfg.name, pretrained=pretrained,
                             num_classes=num_classes, **kwargs)


def _call_with_kwargs(build, model_cfg: ModelConfig, *args, **kwargs) -> nn.Module:
    try:
        return build(*args, **kwargs)
    except (TypeError, KeyError, ValueError, AttributeError) as err:  # a bad argument, or a bad value (act_layer: x)
        raise UserError(f"model.kwargs: {model_cfg.name} does not accept {model_cfg.kwargs} ({type(err).__name__}: "
                        f"{err}); timm's mixer_* names fix their architecture, use model.name {MIXER_FROM_KWARGS} "
                        f"to set it") from err


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if hub_constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(hub_constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub retries for about a minute without network; offline mode reads its cache and fails fast."""
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def head_parameter_names(model: nn.Module) -> list[str]:
    """Full names of the classifier head's parameters, e.g. ["head.weight", "head.bias"]."""
    head = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is head)
    return [f"{prefix}.{name}" for name, _ in head.named_parameters()]


def _check_fits(state: dict[str, Tensor], model: nn.Module, head: set[str], path: Path) -> None:
    expected = {name: tensor for name, tensor in model.state_dict().items() if name not in head}
    for name, tensor in expected.items():
        if name not in state:
            raise UserError(f"model.weights: {path} has no tensor {name} that {type(model).__name__} needs; "
                            "it was made for another architecture (check model.name and model.kwargs)")
        if state[name].shape != tensor.shape:
            raise UserError(f"model.weights: tensor {name} in {path} has shape {tuple(state[name].shape)} but the "
                            f"model needs {tuple(tensor.shape)}; check model.name and model.kwargs")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(f"model.weights: {path} holds tensors the model lacks, e.g. {unexpected[0]}; it was made "
                        "for a larger architecture (check model.name and model.kwargs)")


def _load_vit_npz(model: nn.Module, path: Path) -> None:
    """The original ViT releases, through timm's own JAX loader (which also resamples pos_embed).

    timm's loader copies tensor by tensor without naming the one that fails, so width and depth, the two ways a
    wrong file differs, are compared first.
    """
    if not isinstance(model, VisionTransformer):
        raise UserError(f"model.weights: .npz files are read for ViT and MLP-Mixer models only, not "
                        f"{type(model).__name__}; convert {path} to .safetensors")
    with np.load(path) as npz:
        names = set(npz.files)
        prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in names), None)
        if prefix is None:
            raise UserError(f"model.weights: {path} is not an original ViT .npz release (no embedding/kernel)")
        width = npz[f"{prefix}embedding/kernel"].shape[-1]
        stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"  # big_vision stores blocks stacked
        blocks = f"{prefix}Transformer/encoderblock_"
        depth = npz[stacked].shape[0] if stacked in names else len(
            {name[len(blocks):].split("/")[0] for name in names if name.startswith(blocks)})
    if width != model.embed_dim:
        raise UserError(f"model.weights: tensor {prefix}embedding/kernel in {path} has width {width} but the model's "
                        f"embed_dim is {model.embed_dim}; check model.name and model.kwargs")
    if depth != len(model.blocks):
        raise UserError(f"model.weights: {path} has {depth} encoder blocks but the model has {len(model.blocks)}; "
                        "check model.name and model.kwargs")
    head = model.get_classifier()
    head_state = {name: tensor.clone() for name, tensor in head.state_dict().items()}
    try:
        model.load_pretrained(str(path))
    except (KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"model.weights: {path} does not fit {type(model).__name__}: {err}") from err
    head.load_state_dict(head_state)


def _mixer_state_from_npz(path: Path) -> dict[str, Tensor]:
    """Rename the original Mixer release (Flax names, kernels stored in x out) to timm's MlpMixer names."""
    with np.load(path) as npz:
        arrays = {name: torch.from_numpy(npz[name]) for name in npz.files}
    state = {"stem.proj.weight": arrays.pop("stem/kernel").permute(3, 2, 0, 1),
             "stem.proj.bias": arrays.pop("stem/bias")}
    flax_to_timm = {"LayerNorm_0": "norm1", "LayerNorm_1": "norm2", "token_mixing/Dense_0": "mlp_tokens.fc1",
                    "token_mixing/Dense_1": "mlp_tokens.fc2", "channel_mixing/Dense_0": "mlp_channels.fc1",
                    "channel_mixing/Dense_1": "mlp_channels.fc2", "pre_head_layer_norm": "norm", "head": "head"}
    for name, array in arrays.items():
        scope, leaf = name.rsplit("/", 1)
        block = ""
        if scope.startswith("MixerBlock_"):
            block_scope, scope = scope.split("/", 1)
            block = f"blocks.{block_scope.removeprefix('MixerBlock_')}."
        if scope not in flax_to_timm:
            raise ValueError(f"unexpected tensor {name} for an MLP-Mixer")
        param = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
        state[f"{block}{flax_to_timm[scope]}.{param}"] = array.T if leaf == "kernel" else array
    return state
