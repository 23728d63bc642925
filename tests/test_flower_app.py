"""`lorafair flower` on Flower's simulation engine against `lorafair fit` with the same config and seed.

FLoRA with 5 of 6 clients per round: the ClientApp must catch up with merges of rounds its node sat out. One client
fails in round 2; Flower hands the server an error reply and the round goes on with the others. The same job under
`fit`, with that client's update poisoned (so fit drops it and re-weights the rest), is the reference.
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_args

from lorafair.cli import main

pytestmark = pytest.mark.slow

FAILING = "2:1"
"""Round 2, client 1: a client that trains in that round (the tiny job samples clients 0, 1, 3, 4, 5)."""


def test_flower_simulation_equals_fit(tmp_path, monkeypatch):
    method = ["--server.method", "flora"]
    monkeypatch.setenv("LORAFAIR_POISON", FAILING)
    assert main(["fit", *tiny_args(tmp_path / "fit", *method)]) == 0
    monkeypatch.delenv("LORAFAIR_POISON")
    monkeypatch.setenv("LORAFAIR_CLIENT_ERROR", FAILING)
    assert main(["flower", *tiny_args(tmp_path / "flower", *method)]) == 0
    fit, flower = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("fit", "flower"))

    assert [r["clients"] for r in flower["rounds"]] == [r["clients"] for r in fit["rounds"]]
    assert [3 in r["clients"] for r in flower["rounds"]] == [False, True]  # client 3 catches up with round 1's merge
    for ours, reference in zip(flower["rounds"], fit["rounds"], strict=True):
        # same float32 operations in the same order on one CPU thread: equal, up to summation-order noise
        assert ours["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-12)
        dropped = set(reference["bad_updates"])
        assert ours["train_loss"] == pytest.approx({c: loss for c, loss in reference["train_loss"].items()
                                                    if c not in dropped}, rel=1e-6)
    (reason,) = flower["rounds"][1]["failed_clients"].values()
    assert list(flower["rounds"][1]["failed_clients"]) == ["1"] and "client 1 fails in round 2" in reason
    assert flower["rounds"][0]["failed_clients"] == {} == fit["rounds"][1]["failed_clients"]
    assert flower["final"]["mean_accuracy"] == pytest.approx(fit["final"]["mean_accuracy"], abs=1e-12)
    assert (tmp_path / "flower" / "checkpoints").is_dir() and list((tmp_path / "flower" / "tensorboard").iterdir())
