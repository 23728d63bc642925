"""DataLoaders whose order is a pure function of a seed and which count skipped images across worker processes.

A dataset yields None for an image it skipped (on_bad_image="skip"). The collate function drops those and sends
their count along with the batch, so the main process learns it even when workers decode the images; a UserError
raised while decoding in a worker travels the same way and is raised again in the main process with its own
message (a worker's exception would otherwise arrive wrapped in its traceback).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from lorafair.errors import UserError


@dataclass
class _Failure:
    message: str


class _CatchUserErrors(Dataset):
    """Turns a UserError of the wrapped dataset into a value that can cross a process boundary."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except UserError as err:
            return _Failure(str(err))


def _collate(samples: list) -> tuple[object, int, str | None]:
    """(batch or None when every sample was skipped, number skipped, first error message or None)."""
    failures = [sample.message for sample in samples if isinstance(sample, _Failure)]
    if failures:
        return None, 0, failures[0]
    kept = [sample for sample in samples if sample is not None]
    return (default_collate(kept) if kept else None), len(samples) - len(kept), None


class SkippingLoader:
    """Iterates (images, labels) batches of a DataLoader; `skipped` counts the images dropped so far."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch, skipped, failure in self.loader:
            if failure is not None:
                raise UserError(failure)
            self.skipped += skipped
            if batch is not None:
                yield batch


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                drop_last: bool = False) -> SkippingLoader:
    """A loader whose shuffle order (and worker seeds) depend only on `seed`: every process that builds it with
    the same seed sees the same batches. Each pass over it draws the next order from the seeded generator."""
    return SkippingLoader(DataLoader(
        _CatchUserErrors(dataset), batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        drop_last=drop_last, collate_fn=_collate, generator=torch.Generator().manual_seed(seed),
    ))
