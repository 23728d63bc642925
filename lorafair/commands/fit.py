"""`lorafair fit`."""

from __future__ import annotations

from lorafair.config import FitConfig


def fit(cfg: FitConfig) -> None:
    """Run one federated fine-tuning job."""
    from lorafair.fit import fit as run_fit

    run_fit(cfg)
