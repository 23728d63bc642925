"""`lorafair report`."""

from __future__ import annotations

from pathlib import Path

from lorafair.config import BASELINE


def report(dir: Path, baseline: str = BASELINE) -> None:
    """Rebuild comparison tables and plots from the run folders under a compare output folder.

    Args:
        dir: A compare output folder.
        baseline: The method every other is compared with (paired differences and their 95% intervals).
    """
    from lorafair.reporting.report import report as run_report

    run_report(dir, baseline=baseline)
