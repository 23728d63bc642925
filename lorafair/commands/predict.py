"""`lorafair predict`."""

from __future__ import annotations

from pathlib import Path


def predict(images: list[Path], *, run: Path, round: int | None = None, top_k: int = 5,
            output: Path | None = None, batch_size: int = 64) -> None:
    """Print the top-k classes with probabilities of each image, classified by a run's global model.

    Args:
        images: Image files or folders (searched recursively).
        run: A run folder (its newest checkpoint is used) or a folder `lorafair export` wrote.
        round: Use this round's checkpoint instead.
        top_k: Classes listed per image.
        output: Also write CSV rows (image, rank, class, probability) here.
        batch_size: Images per forward pass.
    """
    from lorafair.inference import predict as run_predict

    run_predict(run, images, round, top_k, output, batch_size)
