"""Shared fixtures: a tiny federated job (a 2-block ViT on 16-pixel digits, 3 local steps) that runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafair.cli import parse
from lorafair.config import FitConfig

torch.set_num_threads(1)
"""The tests' models are tiny: handing their small matrix products to a second thread costs more than it saves, and
on a busy 2-core machine it slows them down many times over."""

TINY_ARGS = [
    "--data.name", "digits", "--data.batch_size", "16", "--data.eval_batch_size", "64", "--data.num_workers", "0",
    "--model.name", "vit_base_patch16_224",
    "--model.kwargs", "{depth: 2, embed_dim: 32, num_heads: 2, img_size: 16, patch_size: 4}",
    "--lora.r", "4", "--federation.rounds", "2", "--federation.clients_per_round", "5",
    "--client.local_epochs", "1", "--client.max_local_steps", "3", "--client.lr", "0.05",
    "--server.method", "lorafair", "--server.steps", "50",
]
"""6 digit domains, one client each, 5 sampled per round: sampling, uneven rank loads and padding all happen."""


@pytest.fixture(autouse=True)
def image_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's decode-once image caches (data.cache auto) go to a fresh folder, never the user's cache."""
    directory = tmp_path_factory.mktemp("image_cache")
    monkeypatch.setenv("LORAFAIR_CACHE_DIR", str(directory))
    return directory


def parse_fit_args(args: list[str]) -> FitConfig:
    """A FitConfig exactly as `lorafair fit ARGS` would build it."""
    _, kwargs = parse(["fit", *args])
    return kwargs["cfg"]


def tiny_args(out_dir: Path, *extra: str) -> list[str]:
    return [*TINY_ARGS, "--out_dir", str(out_dir), *extra]


def tiny_config(out_dir: Path, *extra: str) -> FitConfig:
    return parse_fit_args(tiny_args(out_dir, *extra))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The tiny job run once in this process: (its out_dir, the results fit returned)."""
    from lorafair.fit import fit

    out_dir = tmp_path_factory.mktemp("tiny_run")
    results = fit(tiny_config(out_dir))
    assert json.loads((out_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    return out_dir, results


def items_right_by_hand(trainer, lora: dict, extra: dict) -> dict[str, list[int]]:
    """1/0 per test item, per domain, of a FederatedTrainer's backbone holding (lora, extra): a plain evaluation
    loop, one test set as one batch."""
    model = trainer.model
    model.set_lora(lora)
    model.set_extra(extra)
    model.eval()
    right = {}
    with torch.no_grad():
        for domain, test in trainer.data.test.items():
            images, labels = zip(*(test[i] for i in range(len(test))), strict=True)
            predicted = model(torch.stack(images)).argmax(-1)
            right[domain] = [int(int(p) == label) for p, label in zip(predicted, labels, strict=True)]
    return right
