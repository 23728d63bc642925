"""`lorafair compare`."""

from __future__ import annotations

from lorafair.config import BASELINE, FitConfig


def compare(cfg: FitConfig, methods: str | None = None, seeds: list[int] | None = None, grid: str | None = None,
            baseline: str = BASELINE, jobs: int = 1) -> None:
    """Run several methods (seeds, grid points) with everything else identical and write paper-style tables and plots.

    Args:
        methods: Comma-separated methods to compare, and the bounds centralized and local (default: every method
            and both bounds).
        seeds: Seeds to repeat every run with, e.g. --seeds 0 1 2 (default: the config's seed).
        grid: Sweep one key, e.g. server.lam=0,0.001,0.01 or lora.r=4,8,16.
        baseline: The method every other is compared with (paired differences and their 95% intervals).
        jobs: Runs at once on this machine, each in a process of its own, its output in OUT_DIR/logs/ (e.g. one
            per core for a small model with cpu_threads 1); 1 runs them one after another in this process.
    """
    from lorafair.reporting.compare import compare as run_compare

    chosen = None if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    run_compare(cfg, methods=chosen, seeds=seeds, grid=grid, baseline=baseline, jobs=jobs)
