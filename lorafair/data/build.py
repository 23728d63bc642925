"""The data of a run, whichever its model family: images prepared for the timm model's input contract, or text
tokenized for the language model."""

from __future__ import annotations

from lorafair.config import FitConfig
from lorafair.data.federated import FederatedData, build_federated_data
from lorafair.data.transforms import model_data_config


def build_data(cfg: FitConfig) -> FederatedData:
    """Clients and test sets: images rendered for the timm model, or text tokenized for the transformers one (whose
    modules, and `datasets`, are imported only then)."""
    if cfg.is_language_model:
        from lorafair.data.text import build_text_data, load_tokenizer

        return build_text_data(cfg, load_tokenizer(cfg.model))
    return build_federated_data(cfg.data, cfg.federation, cfg.seed, model_data_config(cfg.model, cfg.data.image_size))
