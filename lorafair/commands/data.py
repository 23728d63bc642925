"""`lorafair data`."""

from __future__ import annotations

from pathlib import Path

from lorafair.config import FitConfig


def data(cfg: FitConfig, plot: Path | None = None, build_cache: bool = False) -> None:
    """Build the datasets and client partition of a config and print one row per client and per domain.

    Args:
        plot: Also write a client x class heatmap PNG here.
        build_cache: Also build (or fully check) the decode-once image cache of every split (data.cache), e.g.
            ahead of a multi-node job.
    """
    from lorafair.data.summary import summarize

    summarize(cfg, plot=plot, build_cache=build_cache)
