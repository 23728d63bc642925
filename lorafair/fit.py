"""`lorafair fit`: the round loop on Lightning Fabric (`lorafair.federated.loop`), then the export of the run's global
model into its folder (`lorafair.export`)."""

from __future__ import annotations

import os
from typing import Any

from lorafair.config import FitConfig
from lorafair.export import export_final
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.federated.run_folder import own_run_folder


def fit(cfg: FitConfig) -> dict[str, Any]:
    """Run the federated job of `cfg` and return the content of its results.json (on every rank)."""
    with own_run_folder(cfg.out_dir, lead=int(os.environ.get("RANK", "0")) == 0):  # under torchrun, rank 0 owns it
        trainer = FederatedTrainer(cfg, launch_fabric(cfg), export=export_final)
        results = trainer.run()
        trainer.transport.close()
    return results
