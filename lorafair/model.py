"""The client model: a frozen timm backbone with peft LoRA adapters and a trainable classifier head.

A client's whole trainable state is small (LoRA factors + head), so one module per rank can host many clients by
swapping that state in and out with get_lora/set_lora and get_extra/set_extra. Every tensor is keyed by the
backbone's own names ("blocks.0.attn.proj", "head.weight"), never by peft's wrapped names.

Reproducible starts: the head and peft's LoRA init draw from torch's global generator, so the trainer seeds it
(torch.manual_seed with a seed derived from the run seed) before construction, and `init_lora(generator)` sets
the LoRA factors explicitly.
"""

from __future__ import annotations

import copy
import math
import re

import lightning
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lorafair.config import ClientConfig, LoraConfig, ModelConfig
from lorafair.errors import UserError
from lorafair.weights import create_backbone, head_parameter_names

VIT_TARGETS = r".*blocks\.\d+\.(attn\.proj|mlp\.fc2)"
"""LoRA targets of the paper's public code for ViT: the attention output and the second MLP layer of each block."""
MIXER_TARGETS = r".*blocks\.\d+\.(mlp_tokens\.fc2|mlp_channels\.fc2)"
"""LoRA targets for MLP-Mixer: the second layer of the token- and channel-mixing MLPs of each block."""

_ADAPTER = "default"


def default_targets(backbone: nn.Module) -> str | None:
    """The LoRA target regex for a backbone family, or None when the family has no default."""
    if isinstance(backbone, VisionTransformer):
        return VIT_TARGETS
    if isinstance(backbone, MlpMixer):
        return MIXER_TARGETS
    return None


def target_layers(backbone: nn.Module, pattern: str | None) -> list[str]:
    """Names of the Linear layers that LoRA adapts: those whose full name matches `pattern`, in model order."""
    linear = [name for name, module in backbone.named_modules() if isinstance(module, nn.Linear)]
    examples = ", ".join(linear[:6])
    if pattern is None:
        raise UserError(f"lora.target_modules: {type(backbone).__name__} has no default; set a regex over its Linear "
                        f"layers, e.g. among: {examples}")
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise UserError(f"lora.target_modules: {pattern!r} is not a valid regex ({err})") from err
    layers = [name for name in linear if regex.fullmatch(name)]
    head_weights = head_parameter_names(backbone)
    head = [name for name in layers if f"{name}.weight" in head_weights]
    if head:
        raise UserError(f"lora.target_modules: {pattern!r} matches the classifier head {head[0]!r}, which is trained "
                        "in full; leave it out of the regex")
    if not layers:
        raise UserError(f"lora.target_modules: {pattern!r} matches no Linear layer of {type(backbone).__name__}; "
                        f"it must match full module names such as: {examples}")
    return layers


class LoraClassifier(lightning.LightningModule):
    """One federated client's model; only the LoRA factors and the classifier head are trainable.

    Built for Lightning Fabric without DDP wrapping: no Trainer-only features (self.log, self.trainer) are used.
    """

    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoraConfig, num_classes: int,
                 client_cfg: ClientConfig) -> None:
        super().__init__()
        self.client_cfg = client_cfg
        self.backbone = create_backbone(model_cfg, num_classes)
        pattern = lora_cfg.target_modules if lora_cfg.target_modules is not None else default_targets(self.backbone)
        self.layer_names: list[str] = target_layers(self.backbone, pattern)
        self.scaling: float = lora_cfg.alpha / lora_cfg.r
        self.alpha = lora_cfg.alpha
        self.lora_rank = lora_cfg.r
        """The rank the model trains and reports now (`set_rank`); lora.r, the global rank, by default."""
        exact_names = "|".join(re.escape(name) for name in self.layer_names)
        peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                  target_modules=exact_names, bias="none")
        inject_adapter_in_model(peft_cfg, self.backbone, adapter_name=_ADAPTER)
        self._head_names = head_parameter_names(self.backbone)
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        for layer in self._layers():
            layer.lora_A[_ADAPTER].weight.requires_grad_(True)
            layer.lora_B[_ADAPTER].weight.requires_grad_(True)
        self.backbone.get_classifier().requires_grad_(True)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    # ---- client state -------------------------------------------------------------------------------------

    def set_rank(self, rank: int) -> None:
        """Act as a rank-`rank` LoRA with its own scaling alpha / rank, on the one adapter of the global rank: the
        components past `rank` are held at zero (`set_lora` pads them), so their gradients are exactly zero too."""
        for layer in self._layers():
            layer.scaling[_ADAPTER] = self.alpha / rank
        self.lora_rank = rank

    def get_lora(self) -> dict[str, tuple[Tensor, Tensor]]:
        """(A: r x in, B: out x r) per adapted layer at the current rank, detached copies."""
        return {name: (layer.lora_A[_ADAPTER].weight[:self.lora_rank].detach().clone(),
                       layer.lora_B[_ADAPTER].weight[:, :self.lora_rank].detach().clone())
                for name, layer in zip(self.layer_names, self._layers(), strict=True)}

    @torch.no_grad()
    def set_lora(self, lora: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Pairs of the current rank; the adapter's components past it are zeroed."""
        for name, layer in zip(self.layer_names, self._layers(), strict=True):
            lora_a, lora_b = lora[name]
            layer.lora_A[_ADAPTER].weight.zero_()[:lora_a.shape[0]].copy_(lora_a)
            layer.lora_B[_ADAPTER].weight.zero_()[:, :lora_b.shape[1]].copy_(lora_b)

    @torch.no_grad()
    def init_lora(self, generator: torch.Generator) -> None:
        """A as peft initialises it (Kaiming-uniform, a=sqrt(5)) but drawn from `generator`; B = 0, so the update
        starts at zero. Layers draw in `layer_names` order, so equal generators give equal factors."""
        for layer in self._layers():
            lora_a = layer.lora_A[_ADAPTER].weight
            # drawn on the CPU so the values do not depend on the device the module lives on
            fresh = torch.empty(lora_a.shape, dtype=lora_a.dtype)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            lora_a.copy_(fresh)
            layer.lora_B[_ADAPTER].weight.zero_()

    def get_extra(self) -> dict[str, Tensor]:
        """The trainable non-LoRA tensors (the classifier head), detached copies."""
        params = dict(self.backbone.named_parameters())
        return {name: params[name].detach().clone() for name in self._head_names}

    @torch.no_grad()
    def set_extra(self, extra: dict[str, Tensor]) -> None:
        params = dict(self.backbone.named_parameters())
        for name in self._head_names:
            params[name].copy_(extra[name])

    @torch.no_grad()
    def merge(self, merge: dict[str, tuple[Tensor, Tensor]]) -> None:
        """W0 += scaling * B @ A for each (A, B) given; any rank (FLoRA sends stacks of rank K*r)."""
        layers = dict(zip(self.layer_names, self._layers(), strict=True))
        for name, (lora_a, lora_b) in merge.items():
            weight = layers[name].base_layer.weight
            weight.add_((lora_b.to(weight) @ lora_a.to(weight)) * self.scaling)

    def base_state(self) -> dict[str, Tensor]:
        """The frozen weight of each adapted layer (the only frozen tensors merges change), detached copies."""
        return {name: layer.base_layer.weight.detach().clone()
                for name, layer in zip(self.layer_names, self._layers(), strict=True)}

    @torch.no_grad()
    def load_base_state(self, state: dict[str, Tensor]) -> None:
        for name, layer in zip(self.layer_names, self._layers(), strict=True):
            layer.base_layer.weight.copy_(state[name])

    def plain_backbone(self) -> nn.Module:
        """A copy of the backbone without LoRA: the frozen weights (merges included) and the head, as the plain
        timm model the global adapter applies to."""
        backbone = copy.deepcopy(self.backbone)
        del backbone.peft_config
        for layer in self.layer_names:
            backbone.set_submodule(layer, backbone.get_submodule(layer).base_layer)
        return backbone.requires_grad_(True)

    def freeze_lora_A(self, frozen: bool) -> None:
        """FFA-LoRA trains B only, keeping A at its shared seeded init."""
        for layer in self._layers():
            layer.lora_A[_ADAPTER].weight.requires_grad_(not frozen)

    # ---- data and training --------------------------------------------------------------------------------

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> tuple[Tensor, Tensor]:
        """Updates `val_accuracy` and returns (correct, total) of the batch as 0-d int64 tensors, to sum across
        ranks; the caller computes and resets `val_accuracy`."""
        images, labels = batch
        predictions = self(images).argmax(dim=-1)
        self.val_accuracy.update(predictions, labels)
        return (predictions == labels).sum(), torch.tensor(labels.numel(), device=labels.device)

    def on_validation_epoch_end(self) -> None:
        self.val_accuracy.reset()

    def configure_optimizers(self) -> torch.optim.SGD:
        """SGD over what is trainable now; call again after freeze_lora_A."""
        cfg = self.client_cfg
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=cfg.lr,
                               momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    # ---- helpers ------------------------------------------------------------------------------------------

    def _layers(self) -> list[nn.Module]:
        return [self.backbone.get_submodule(name) for name in self.layer_names]
