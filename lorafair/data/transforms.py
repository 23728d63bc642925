"""The model's input contract (timm data config) and the image transforms built from it.

A pretrained backbone expects the size, interpolation and normalisation it was trained with; timm records those in
the model's pretrained config, so the data is prepared from that config rather than from separate settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import timm.data
import torch
from timm.layers import PatchEmbed

from lorafair.config import DataConfig, ModelConfig
from lorafair.weights import create_backbone


def model_data_config(model_cfg: ModelConfig, image_size: int | None = None) -> dict:
    """The timm data config (input_size, interpolation, mean, std, crop_pct) of the configured model, found by
    building the model on the meta device so no weights are allocated or downloaded. The size the model is built
    for (e.g. model.kwargs img_size=32), then `image_size`, override the pretrained input size."""
    with torch.device("meta"):
        model = create_backbone(replace(model_cfg, pretrained=False, weights=None), num_classes=1)
    return with_image_size(backbone_data_config(model), image_size)


def backbone_data_config(model: torch.nn.Module) -> dict:
    """timm's data config of a built backbone, with the input size it was built for (e.g. img_size=32)."""
    patch_embed = next((module for module in model.modules() if isinstance(module, PatchEmbed)), None)
    built_for = patch_embed.img_size if patch_embed is not None else None
    return with_image_size(timm.data.resolve_data_config(model=model), built_for)


def with_image_size(data_config: dict, image_size: int | tuple[int, int] | list[int] | None) -> dict:
    """A copy of `data_config` whose input_size is `image_size` (int or (H, W)); None keeps it."""
    data_config = dict(data_config)
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        data_config["input_size"] = (3, int(height), int(width))
    return data_config


def image_transforms(data_config: dict, data_cfg: DataConfig) -> tuple[Callable, Callable]:
    """(train, eval) transforms from a PIL image to a normalised float tensor, as timm builds them.

    Eval resizes to size / crop_pct and centre-crops. Train is the same unless data.augment, which adds a random
    resized crop and a horizontal flip (no colour jitter, as in the paper's public code).
    """
    common = dict(input_size=data_config["input_size"], interpolation=data_config["interpolation"],
                  mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
                  crop_mode=data_config.get("crop_mode"))
    eval_transform = timm.data.create_transform(is_training=False, **common)
    if not data_cfg.augment:
        return eval_transform, eval_transform
    train_transform = timm.data.create_transform(is_training=True, color_jitter=None, **common)
    return train_transform, eval_transform
