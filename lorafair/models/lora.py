"""Which layers get LoRA, and the swappable LoRA state of a module adapted by peft, shared by the image and the text
client models.

A client's LoRA factors are keyed by the adapted layers' own names ("blocks.0.attn.proj"), never by peft's wrapped
names, so the server and the checkpoints see the same keys whatever the model family.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lorafair.aggregation import core_of, ranks
from lorafair.config import LoraConfig
from lorafair.errors import UserError
from lorafair.keys import Pairs
from lorafair.seeds import fresh_lora

_ADAPTER = "default"


def check_rank(r: int, layers: dict[str, nn.Linear]) -> None:
    """A rank above a layer's smaller side adds parameters but no expressiveness: B @ A is out x in."""
    name, layer = min(layers.items(), key=lambda item: min(item[1].in_features, item[1].out_features))
    width = min(layer.in_features, layer.out_features)
    if r > width:
        raise UserError(f"lora.r: {r} is larger than the smallest adapted layer ({name}, {layer.out_features} x "
                        f"{layer.in_features}); use at most {width}")


def target_layers(backbone: nn.Module, pattern: str | None, head_weights: list[str]) -> list[str]:
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
    head = [name for name in layers if f"{name}.weight" in head_weights]
    if head:
        raise UserError(f"lora.target_modules: {pattern!r} matches the classifier head {head[0]!r}, which is trained "
                        "in full; leave it out of the regex")
    if not layers:
        raise UserError(f"lora.target_modules: {pattern!r} matches no Linear layer of {type(backbone).__name__}; "
                        f"it must match full module names such as: {examples}")
    return layers


def peft_config(lora_cfg: LoraConfig, layer_names: list[str], modules_to_save: list[str] | None = None,
                task_type: str | None = None) -> PeftLoraConfig:
    """peft's LoraConfig of the lora section on exactly `layer_names`, without bias: the one place it is built, for
    the adapter a client model trains and for the one an export writes (with the modules it saves beside the
    factors, and a task type where peft needs one to load it)."""
    return PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules="|".join(re.escape(name) for name in layer_names), bias="none",
                          modules_to_save=modules_to_save, task_type=task_type)


class PeftLoraState:
    """Mixin for a module whose `backbone` gets peft LoRA on `layer_names`: inject, read, write, merge the factors;
    read and write the trainable tensors outside LoRA (`_head_names`: a classifier's head, none for a causal LM)."""

    backbone: nn.Module
    layer_names: list[str]
    _head_names: list[str]
    scaling: float
    """alpha / lora.r: the global model's scaling, the one merges use."""
    alpha: float
    lora_rank: int
    """The rank the model trains and reports now (`set_rank`); lora.r, the global rank, by default."""

    def inject_lora(self, lora_cfg: LoraConfig, layer_names: list[str]) -> None:
        """Put LoRA on exactly these Linear layers and freeze everything else of the backbone; the factors are
        kept in float32 whatever the dtype of the frozen weights."""
        check_rank(lora_cfg.r, {name: self.backbone.get_submodule(name) for name in layer_names})
        self.layer_names = layer_names
        self.scaling = ranks.scaling(lora_cfg.alpha, lora_cfg.r)
        self.alpha, self.lora_rank = lora_cfg.alpha, lora_cfg.r
        inject_adapter_in_model(peft_config(lora_cfg, layer_names), self.backbone, adapter_name=_ADAPTER)
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        for layer in self._layers():
            for factor in (layer.lora_A[_ADAPTER], layer.lora_B[_ADAPTER]):
                factor.float().weight.requires_grad_(True)

    # ---- client state -------------------------------------------------------------------------------------

    def get_extra(self) -> dict[str, Tensor]:
        """The trainable tensors outside LoRA, detached copies."""
        params = dict(self.backbone.named_parameters())
        return {name: params[name].detach().clone() for name in self._head_names}

    @torch.no_grad()
    def set_extra(self, extra: dict[str, Tensor]) -> None:
        params = dict(self.backbone.named_parameters())
        for name in self._head_names:
            params[name].copy_(extra[name])

    def set_rank(self, rank: int) -> None:
        """Act as a rank-`rank` LoRA with its own scaling alpha / rank, on the one adapter of the global rank: the
        components past `rank` are held at zero (`set_lora` pads them), so their gradients are exactly zero too."""
        for layer in self._layers():
            layer.scaling[_ADAPTER] = ranks.scaling(self.alpha, rank)
        self.lora_rank = rank

    def get_lora(self) -> dict[str, tuple[Tensor, Tensor]]:
        """(A: r x in, B: out x r) per adapted layer at the current rank, detached copies."""
        return {name: (layer.lora_A[_ADAPTER].weight[:self.lora_rank].detach().clone(),
                       layer.lora_B[_ADAPTER].weight[:, :self.lora_rank].detach().clone())
                for name, layer in zip(self.layer_names, self._layers(), strict=True)}

    def lora_parameters(self) -> dict[str, tuple[Tensor, Tensor]]:
        """(A, B) per adapted layer at the current rank, the live parameters (not copies), for a penalty on them
        that training differentiates."""
        rank = self.lora_rank
        return {name: (layer.lora_A[_ADAPTER].weight[:rank], layer.lora_B[_ADAPTER].weight[:, :rank])
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
        """A fresh LoRA start (`lorafair.seeds.fresh_lora`: A as peft initialises it but drawn from `generator`,
        B = 0) in every adapted layer, drawn in `layer_names` order."""
        layers = dict(zip(self.layer_names, self._layers(), strict=True))
        fresh = fresh_lora({name: (layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight)
                            for name, layer in layers.items()}, generator)
        for name, (lora_a, _) in fresh.items():
            layers[name].lora_A[_ADAPTER].weight.copy_(lora_a)
            layers[name].lora_B[_ADAPTER].weight.zero_()

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
        model the global adapter applies to."""
        backbone = copy.deepcopy(self.backbone)
        del backbone.peft_config
        for layer in self.layer_names:
            backbone.set_submodule(layer, backbone.get_submodule(layer).base_layer)
        return backbone.requires_grad_(True)

    def train_factors(self, factors: str) -> None:
        """Train only the given LoRA factors ("AB", "A" or "B"; a method's `ClientRule.trains`): the others are
        left out of the optimizer (`configure_optimizers` afterwards) and keep their value bit for bit."""
        for layer in self._layers():
            layer.lora_A[_ADAPTER].weight.requires_grad_("A" in factors)
            layer.lora_B[_ADAPTER].weight.requires_grad_("B" in factors)

    @contextmanager
    def core_only(self, basis: dict[str, Tensor] | None) -> Iterator[None]:
        """Within: each layer's A is R @ A0 with A0 = basis[layer] (r x in, orthonormal rows) fixed and its r x r
        core R, starting at A A0^T, the trainable tensor in A's place (Fed-SB), so any optimizer trains R itself; on
        leaving, A is the product R @ A0 again. None: nothing changes."""
        if basis is None:
            yield
            return
        for name, layer in zip(self.layer_names, self._layers(), strict=True):
            parametrize.register_parametrization(layer.lora_A[_ADAPTER], "weight", _Core(basis[name]))
        try:
            yield
        finally:
            for layer in self._layers():
                parametrize.remove_parametrizations(layer.lora_A[_ADAPTER], "weight", leave_parametrized=True)

    def frozen_weights(self) -> dict[str, nn.Parameter]:
        """The frozen weight of each adapted layer, the parameter itself (a start that takes its gradient)."""
        return {name: layer.base_layer.weight for name, layer in zip(self.layer_names, self._layers(), strict=True)}

    # ---- a local adapter (`ClientRule.local`) --------------------------------------------------------------

    def set_local_lora(self, lora: Pairs | None) -> None:
        """Hold a second LoRA pair per adapted layer, of the current rank and scaling (None: none), which adds to a
        layer's output with the weight `mix_adapters` gives it; it trains only after `train_local(True)`. Its
        factors are `local_factors`, (A, B) of each layer in `layer_names` order, a module's parameters."""
        if lora is None:
            self.local_factors = None
            return
        if not hasattr(self, "_mix"):  # the hooks, once: they do nothing while the mix is (1, 0)
            self._mix: tuple[Tensor | float, Tensor | float] = (1.0, 0.0)
            for index, layer in enumerate(self._layers()):
                layer.register_forward_hook(self._mixing_hook(index))
        device = self._layers()[0].lora_A[_ADAPTER].weight.device
        self.local_factors = nn.ParameterList(
            [nn.Parameter(factor.detach().to(device, torch.float32, copy=True), requires_grad=False)
             for name in self.layer_names for factor in lora[name]])

    def get_local_lora(self) -> Pairs:
        """The local adapter, detached copies."""
        factors = list(self.local_factors)
        return {name: (factors[2 * i].detach().clone(), factors[2 * i + 1].detach().clone())
                for i, name in enumerate(self.layer_names)}

    def mix_adapters(self, shared: Tensor | float, local: Tensor | float) -> None:
        """Each adapted layer's output becomes W0 x + shared * s B A x + local * s B_l A_l x, each weight a number
        or one per input of the batch; (1, 0), the default, is the shared pair alone."""
        self._mix = (shared, local)
        plain = isinstance(shared, float) and isinstance(local, float) and (shared, local) == (1.0, 0.0)
        for layer in self._layers():  # mixed, the hooks add both pairs and peft's own adds nothing
            layer.scaling[_ADAPTER] = ranks.scaling(self.alpha, self.lora_rank) if plain else 0.0

    def train_local(self, local: bool) -> None:
        """True: train the local adapter alone (the shared factors and the head frozen); False: freeze it and train
        the head again (the shared factors follow `train_factors`)."""
        for factor in getattr(self, "local_factors", None) or []:
            factor.requires_grad_(local)
        params = dict(self.backbone.named_parameters())
        for name in self._head_names:
            params[name].requires_grad_(not local)
        if local:
            self.train_factors("")

    def _mixing_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            shared, local = self._mix
            if getattr(self, "local_factors", None) is None or module.scaling[_ADAPTER] != 0.0:
                return None
            inputs = module.lora_dropout[_ADAPTER](args[0].to(torch.float32))
            scaling = ranks.scaling(self.alpha, self.lora_rank)
            local_a, local_b = self.local_factors[2 * index], self.local_factors[2 * index + 1]
            pairs = ((shared, module.lora_A[_ADAPTER].weight, module.lora_B[_ADAPTER].weight),
                     (local, local_a, local_b))
            added = sum(_per_input(weight, inputs) * F.linear(F.linear(inputs, a), b) for weight, a, b in pairs)
            return output + (scaling * added).to(output.dtype)
        return hook

    def _layers(self) -> list[nn.Module]:
        return [self.backbone.get_submodule(name) for name in self.layer_names]


class _Core(nn.Module):
    """The parametrization A = R @ A0 of a LoRA A over a fixed basis A0 of orthonormal rows: R (r x r) is held."""

    def __init__(self, basis: Tensor) -> None:
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, core: Tensor) -> Tensor:
        return core @ self.basis

    def right_inverse(self, weight: Tensor) -> Tensor:
        return core_of(weight, self.basis)


def _per_input(weight: Tensor | float, inputs: Tensor) -> Tensor | float:
    """A weight per input of the batch shaped to scale `inputs` (batch first), or a number as it is."""
    if isinstance(weight, Tensor):
        return weight.to(inputs.dtype).reshape(-1, *([1] * (inputs.dim() - 1)))
    return weight
