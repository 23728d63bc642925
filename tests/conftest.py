"""Fixtures shared by the tests (their builders: tests/helpers.py): a fresh image cache per test, and the tiny
federated job (a 2-block ViT on 16-pixel digits, 3 local steps) run once per process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import tiny_config

torch.set_num_threads(1)
"""The tests' models are tiny: handing their small matrix products to a second thread costs more than it saves, and
on a busy 2-core machine it slows them down many times over."""


@pytest.fixture(autouse=True)
def image_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's decode-once image caches (data.cache auto) go to a fresh folder, never the user's cache."""
    directory = tmp_path_factory.mktemp("image_cache")
    monkeypatch.setenv("LORAFAIR_CACHE_DIR", str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The tiny job run once in this process: (its out_dir, the results fit returned)."""
    from lorafair.fit import fit

    out_dir = tmp_path_factory.mktemp("tiny_run")
    results = fit(tiny_config(out_dir))
    assert json.loads((out_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    return out_dir, results
