"""`lorafair export`."""

from __future__ import annotations

from pathlib import Path


def export(*, run: Path, round: int | None = None, out: Path | None = None, overwrite: bool = False,
           client: int | None = None) -> None:
    """Write a run's global model, or one client's own model, as a peft adapter and timm (or transformers) models
    (fit writes run_dir/final at its end, unless --export false).

    Args:
        run: A run folder (its newest checkpoint is used).
        round: Export this round's checkpoint instead (a run keeps its newest two).
        out: Export folder (default: RUN/final, or RUN/final_client<id> with --client).
        overwrite: Replace an existing export folder.
        client: Export this client's own model instead: the global model with what the client keeps of its own
            (FedSA-LoRA: its B; the local bound: everything); refused where the run's clients keep nothing.
    """
    from lorafair.export import export_run

    export_run(run, round, out, overwrite, client=client)
