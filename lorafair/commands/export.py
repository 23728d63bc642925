"""`lorafair export`."""

from __future__ import annotations

from pathlib import Path


def export(*, run: Path, round: int | None = None, out: Path | None = None, overwrite: bool = False) -> None:
    """Write a run's global model as a peft adapter and timm (or transformers) models (fit writes run_dir/final at
    its end, unless --export false).

    Args:
        run: A run folder (its newest checkpoint is used).
        round: Export this round's checkpoint instead (a run keeps its newest two).
        out: Export folder (default: RUN/final).
        overwrite: Replace an existing export folder.
    """
    from lorafair.export import export_run

    export_run(run, round, out, overwrite)
