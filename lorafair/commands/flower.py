"""`lorafair flower`."""

from __future__ import annotations

from lorafair.config import FitConfig
from lorafair.errors import UserError


def flower(cfg: FitConfig) -> None:
    """Run the job of `fit` on Flower's simulation engine, one SuperNode per client (pip install lorafair[flower])."""
    try:
        from lorafair.flower.app import simulate
    except ImportError as err:
        raise UserError(f"lorafair flower needs Flower ({err}); install it with pip install lorafair[flower]") from err
    simulate(cfg)
