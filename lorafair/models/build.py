"""The client model of a run, whichever its family: the one place that asks which family a config trains."""

from __future__ import annotations

import torch
from torch import nn

from lorafair.config import FitConfig
from lorafair.keys import pack, pack_pairs
from lorafair.models.image import LoraClassifier
from lorafair.seeds import derive_seed


def build_model(cfg: FitConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The client model of this process, with identical random parts (head, LoRA, a backbone without weights) on
    every rank, and in `lorafair export` which rebuilds a run's global model from a checkpoint. The text model's
    module (and transformers) is imported only for a language model."""
    torch.manual_seed(derive_seed("model", cfg.seed))
    if cfg.is_language_model:
        from lorafair.models.text import TextLoraModel

        model = TextLoraModel(cfg, num_classes).to(device)
    else:
        model = LoraClassifier(cfg.model, cfg.lora, num_classes, cfg.client).to(device)
    return model


def state_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """The shapes a checkpoint's tensors must have to fit `model`, in the packed key format."""
    tensors = {**pack_pairs("lora", model.get_lora()), **pack("extra", model.get_extra()),
               **pack("base", model.base_state())}
    return {key: tensor.shape for key, tensor in tensors.items()}
