"""The image client model: a frozen timm backbone with peft LoRA adapters and a trainable classifier head.

A client's whole trainable state is small (LoRA factors + head), so one module per rank can host many clients by
swapping that state in and out with get_lora/set_lora and get_extra/set_extra. Every tensor is keyed by the
backbone's own names ("blocks.0.attn.proj", "head.weight"), never by peft's wrapped names.

Reproducible starts: the head and peft's LoRA init draw from torch's global generator, so the trainer seeds it
(torch.manual_seed with a seed derived from the run seed) before construction, and `init_lora(generator)` sets
the LoRA factors explicitly.
"""

from __future__ import annotations

import lightning
import torch
import torch.nn.functional as F
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lorafair.config import ClientConfig, LoraConfig, ModelConfig
from lorafair.models.lora import PeftLoraState, target_layers
from lorafair.weights import create_backbone, head_parameter_names

VIT_TARGETS = r".*blocks\.\d+\.(attn\.proj|mlp\.fc2)"
"""LoRA targets of the paper's public code for ViT: the attention output and the second MLP layer of each block."""
MIXER_TARGETS = r".*blocks\.\d+\.(mlp_tokens\.fc2|mlp_channels\.fc2)"
"""LoRA targets for MLP-Mixer: the second layer of the token- and channel-mixing MLPs of each block."""

def default_targets(backbone: nn.Module) -> str | None:
    """The LoRA target regex for a backbone family, or None when the family has no default."""
    if isinstance(backbone, VisionTransformer):
        return VIT_TARGETS
    if isinstance(backbone, MlpMixer):
        return MIXER_TARGETS
    return None


class LoraClassifier(PeftLoraState, lightning.LightningModule):
    """One federated client's model; only the LoRA factors and the classifier head are trainable.

    Built for Lightning Fabric without DDP wrapping: no Trainer-only features (self.log, self.trainer) are used.
    """

    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoraConfig, num_classes: int,
                 client_cfg: ClientConfig) -> None:
        super().__init__()
        self.client_cfg = client_cfg
        self.backbone = create_backbone(model_cfg, num_classes)
        pattern = lora_cfg.target_modules if lora_cfg.target_modules is not None else default_targets(self.backbone)
        self._head_names = head_parameter_names(self.backbone)
        self.inject_lora(lora_cfg, target_layers(self.backbone, pattern, self._head_names))
        self.backbone.get_classifier().requires_grad_(True)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def representations(self, images: Tensor) -> Tensor:
        """The backbone's pooled features before the head, one row per image: what a local adapter's per-input
        weight compares (`ClientRule.local`)."""
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    # ---- data and training --------------------------------------------------------------------------------

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> tuple[Tensor]:
        """Updates `val_accuracy` and returns (whether each image is classified right,) as a bool tensor; the
        caller computes and resets `val_accuracy`."""
        images, labels = batch
        predictions = self(images).argmax(dim=-1)
        self.val_accuracy.update(predictions, labels)
        return (predictions == labels,)

    def on_validation_epoch_end(self) -> None:
        self.val_accuracy.reset()

    def configure_optimizers(self) -> torch.optim.SGD:
        """SGD over what is trainable now; call again after train_factors."""
        cfg = self.client_cfg
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=cfg.lr,
                               momentum=cfg.momentum, weight_decay=cfg.weight_decay)
