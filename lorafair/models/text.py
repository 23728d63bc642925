"""The text client model: a frozen `transformers` causal LM or sequence classifier with peft LoRA.

It offers the client role the same methods as the image model (`lorafair.federated.client.ClientModel`), so the
round loop, every aggregation method, resume and torchrun work unchanged. The trainable state is the LoRA factors
plus, for a classifier, its head (the parameters outside the transformer body); a causal LM has no extra tensors.
Batches come from `lorafair.data.text`: inputs = stack(ids, mask) padded to text.max_length, trimmed here to the
columns the batch uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafair.config import FitConfig, ModelConfig
from lorafair.data.text import IGNORE_INDEX, answers_from_codes, extract_answer, load_tokenizer
from lorafair.errors import UserError
from lorafair.models.lora import PeftLoraState, target_layers
from lorafair.weights import resolve_weights_path


def default_targets(model: nn.Module) -> str | None:
    """peft's default LoRA targets for the architecture (LLaMA: q_proj, v_proj; RoBERTa: query, value) as a regex."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    names = DEFAULTS.get(model.config.model_type)
    return None if names is None else rf".*\.({'|'.join(map(re.escape, names))})"


def four_bit_config(model_cfg: ModelConfig):
    """bitsandbytes NF4 settings for model.load_in_4bit, or None; refused where it cannot run."""
    if not model_cfg.load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise UserError("model.load_in_4bit: 4-bit weights (bitsandbytes) need a CUDA GPU and none is visible; set "
                        "model.load_in_4bit false")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise UserError("model.load_in_4bit: bitsandbytes is not installed (pip install bitsandbytes); or set "
                        "model.load_in_4bit false") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def load_transformer(model_cfg: ModelConfig, classifier: bool, num_classes: int, tokenizer) -> nn.Module:
    """From a local folder (also beside the package), a hub name (pretrained true), or built at random from the
    config of a model type (model.kwargs; the vocabulary is the tokenizer's)."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    head = {"num_labels": num_classes, "pad_token_id": tokenizer.pad_token_id} if classifier else {}
    dtype = getattr(torch, model_cfg.dtype)
    quantization = four_bit_config(model_cfg)
    local = resolve_weights_path(Path(model_cfg.name))
    if local.is_dir() or model_cfg.pretrained:
        source = str(local) if local.is_dir() else model_cfg.name
        try:
            return auto.from_pretrained(source, dtype=dtype, quantization_config=quantization, **head,
                                        **model_cfg.kwargs)
        except OSError as err:
            raise UserError(f"model.name: cannot load {source!r} ({str(err).splitlines()[0]})") from err
    if model_cfg.name not in CONFIG_MAPPING:
        raise UserError(f"model.name: {model_cfg.name!r} is neither a model folder nor a model type such as llama or "
                        f"roberta; set model.pretrained true to fetch a hub name")
    if quantization is not None:
        raise UserError("model.load_in_4bit: a model built at random cannot be loaded in 4 bits; give a model folder")
    config = AutoConfig.for_model(model_cfg.name, **{"vocab_size": len(tokenizer), **head, **model_cfg.kwargs})
    return auto.from_config(config, dtype=dtype)


def trim(inputs: Tensor) -> slice:
    """The columns some row of a batch uses (items are padded to text.max_length, left or right)."""
    used = inputs[:, 1].any(dim=0).nonzero()
    return slice(int(used[0]), int(used[-1]) + 1)


class TextLoraModel(PeftLoraState, lightning.LightningModule):
    """One federated client's language model; only the LoRA factors (and a classifier's head) are trainable."""

    def __init__(self, cfg: FitConfig, num_classes: int) -> None:
        super().__init__()
        self.client_cfg, self.text_cfg = cfg.client, cfg.text
        self.classifier = cfg.is_text_classifier
        self.tokenizer = load_tokenizer(cfg.model)
        self.backbone = load_transformer(cfg.model, self.classifier, num_classes, self.tokenizer)
        prefix = self.backbone.base_model_prefix
        self._head_names = [name for name, _ in self.backbone.named_parameters()
                            if self.classifier and not name.startswith(f"{prefix}.")]
        pattern = cfg.lora.target_modules if cfg.lora.target_modules is not None else default_targets(self.backbone)
        self.inject_lora(cfg.lora, target_layers(self.backbone, pattern, self._head_names))
        params = dict(self.backbone.named_parameters())
        for name in self._head_names:
            params[name].data = params[name].data.float()
            params[name].requires_grad_(True)
        if cfg.model.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.backbone.config.use_cache = False

    # ---- training and evaluation --------------------------------------------------------------------------

    def representations(self, inputs: Tensor) -> Tensor:
        """The last layer's hidden state at each item's last token (the official FedDPA code's default embedding),
        one row per item: what a local adapter's per-input weight compares (`ClientRule.local`). An item is read
        from its first two rows, stack(ids, mask): the whole text of a training item, the prompt of a test item of
        instruction data."""
        used = trim(inputs)
        ids, mask = inputs[:, 0, used], inputs[:, 1, used]
        hidden = self.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=-1)
        return hidden[torch.arange(len(ids), device=ids.device), last]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of the class, or of the response tokens (labels are -100 elsewhere)."""
        inputs, targets = batch
        used = trim(inputs)
        ids, mask = inputs[:, 0, used], inputs[:, 1, used]
        if self.classifier:
            return F.cross_entropy(self.backbone(input_ids=ids, attention_mask=mask).logits.float(), targets)
        return self.backbone(input_ids=ids, attention_mask=mask, labels=targets[:, used]).loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> tuple[Tensor, ...]:
        """(whether each item is right,) for a classifier: the predicted class. For instruction data (whether each
        item is right, loss sum, response tokens): the exact match of the final answer extracted from a greedy
        generation of at most text.max_new_tokens tokens, and the summed cross-entropy of the response tokens (the
        training loss's terms) with their count."""
        inputs, targets = batch
        used = trim(inputs)
        ids, mask = inputs[:, 0, used], inputs[:, 1, used]
        if self.classifier:
            predictions = self.backbone(input_ids=ids, attention_mask=mask).logits.argmax(dim=-1)
            return (predictions == targets,)
        generated = self.backbone.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.text_cfg
                                           .max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                           eos_token_id=self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
        answers = [extract_answer(text, self.text_cfg.answer_pattern) for text in texts]
        correct = [answer is not None and answer == reference
                   for answer, reference in zip(answers, answers_from_codes(targets), strict=True)]
        return (torch.tensor(correct, dtype=torch.bool, device=ids.device), *self.response_loss(inputs[:, 2:]))

    def response_loss(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """(sum of the cross-entropies, count) of the response tokens of stack(ids, mask, labels) items."""
        used = trim(inputs)
        ids, mask, labels = inputs[:, 0, used], inputs[:, 1, used], inputs[:, 2, used]
        logits = self.backbone(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        return loss, (targets != IGNORE_INDEX).sum()

    def on_validation_epoch_end(self) -> None:
        """Nothing accumulates between batches."""

    def configure_optimizers(self) -> torch.optim.SGD:
        """SGD over what is trainable now, as the image client."""
        cfg = self.client_cfg
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=cfg.lr,
                               momentum=cfg.momentum, weight_decay=cfg.weight_decay)
