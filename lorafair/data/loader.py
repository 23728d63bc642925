"""DataLoaders whose order is a pure function of a seed and which count skipped images across worker processes.

Datasets backed by the decode-once cache (`CachedImageDataset`, also inside Subset and ConcatDataset) get a
`CachedLoader` instead: the same batches in the same order, read with one gather per cache file per batch in the
training process. Any other dataset gets a `SkippingLoader` over a torch DataLoader.

A dataset yields None for an image it skipped (on_bad_image="skip"). The collate function drops those and sends
their indices along with the batch, so the main process learns it even when workers decode the images; a UserError
raised while decoding in a worker travels the same way and is raised again in the main process with its own
message (a worker's exception would otherwise arrive wrapped in its traceback).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, default_collate

from lorafair.data.cache import CachedImageDataset, normalize
from lorafair.errors import UserError
from lorafair.processes import die_with_parent


@dataclass
class _Failure:
    message: str


@dataclass
class _Skipped:
    index: int


class _CatchUserErrors(Dataset):
    """Turns a UserError of the wrapped dataset into a value that can cross a process boundary."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            sample = self.dataset[index]
        except UserError as err:
            return _Failure(str(err))
        return _Skipped(index) if sample is None else sample


def _collate(samples: list) -> tuple[object, list[int], str | None]:
    """(batch or None when every sample was skipped, indices skipped, first error message or None)."""
    failures = [sample.message for sample in samples if isinstance(sample, _Failure)]
    if failures:
        return None, [], failures[0]
    kept = [sample for sample in samples if not isinstance(sample, _Skipped)]
    skipped = [sample.index for sample in samples if isinstance(sample, _Skipped)]
    return (default_collate(kept) if kept else None), skipped, None


class _SkippingBatches:
    """What both loaders share: their length in batches, and `skipped`, the number of distinct images dropped so far
    (a bad file met again in a later epoch counts once)."""

    def __init__(self, batches: Sized) -> None:
        self._batches = batches
        self.skipped_items: set[int] = set()

    @property
    def skipped(self) -> int:
        return len(self.skipped_items)

    def __len__(self) -> int:
        return len(self._batches)


class SkippingLoader(_SkippingBatches):
    """Iterates (images, labels) batches of a DataLoader, counting the images it skipped."""

    def __init__(self, loader: DataLoader) -> None:
        super().__init__(loader)
        self.loader = loader

    def __iter__(self) -> Iterator:
        for batch, skipped, failure in self.loader:
            if failure is not None:
                raise UserError(failure)
            self.skipped_items.update(skipped)
            if batch is not None:
                yield batch


def _order(length: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> DataLoader:
    """Batches of positions drawn exactly as make_loader's DataLoader draws the batches of a dataset this long."""
    return DataLoader(range(length), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      collate_fn=np.asarray, generator=torch.Generator().manual_seed(seed))


def _cached_parts(dataset: Dataset) -> tuple[list[CachedImageDataset], np.ndarray, np.ndarray] | None:
    """(the cached datasets under `dataset`, which one each item comes from, its index there), or None when any
    item is not cached. Subset and ConcatDataset are followed down."""
    if isinstance(dataset, CachedImageDataset):
        return [dataset], np.zeros(len(dataset), dtype=np.int64), np.arange(len(dataset))
    if isinstance(dataset, Subset):
        inner = _cached_parts(dataset.dataset)
        if inner is None:
            return None
        indices = np.asarray(dataset.indices, dtype=np.int64)
        return inner[0], inner[1][indices], inner[2][indices]
    if isinstance(dataset, ConcatDataset):
        parts = [_cached_parts(child) for child in dataset.datasets]
        if not parts or any(part is None for part in parts):
            return None
        offsets = np.cumsum([0] + [len(sources) for sources, _, _ in parts])
        return ([source for sources, _, _ in parts for source in sources],
                np.concatenate([which + offset for (_, which, _), offset in zip(parts, offsets, strict=False)]),
                np.concatenate([local for _, _, local in parts]))
    return None


class CachedLoader(_SkippingBatches):
    """(images, labels) batches of cached datasets, normalised on `device`; `skipped` is the number of distinct
    unreadable images met so far (a later epoch meeting them again adds none).

    Each batch is gathered from each cache file with one sorted fancy index into pinned memory (on CUDA), copied
    without blocking, put back into the sampled order and normalised on the device. With augment, the random crop
    and flip run per image on the uint8 pixels, in this process and from torch's global generator (as the PIL
    path does with num_workers 0)."""

    def __init__(self, sources: list[CachedImageDataset], which: np.ndarray, local: np.ndarray, batch_size: int,
                 shuffle: bool, seed: int, drop_last: bool, device: torch.device) -> None:
        self.sources, self.which, self.local = sources, which, local
        self.stores = [source.store() for source in sources]
        self.readable = _per_item([store.readable for store in self.stores], which, local)
        self.labels = _per_item([source.labels for source in sources], which, local)
        self.order = _order(len(which), batch_size, shuffle, seed, drop_last)
        super().__init__(self.order)
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.mean, self.std = sources[0].mean.to(self.device), sources[0].std.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for positions in self.order:
            keep = positions[self.readable[positions]]
            self.skipped_items.update(positions[~self.readable[positions]].tolist())
            if len(keep):
                yield self._batch(keep)

    def _batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # read in (file, index) order, then put the rows back where the sampler placed them
        gather_order = np.lexsort((self.local[positions], self.which[positions]))
        pixels = self._gather(self.which[positions][gather_order], self.local[positions][gather_order])
        labels = torch.from_numpy(self.labels[positions])
        if self.pin:
            labels = labels.pin_memory()
        pixels = pixels.to(self.device, non_blocking=self.pin)
        if np.any(gather_order != np.arange(len(positions))):
            restore = torch.from_numpy(np.argsort(gather_order)).to(self.device, non_blocking=self.pin)
            pixels = pixels.index_select(0, restore)
        return normalize(pixels, self.mean, self.std), labels.to(self.device, non_blocking=self.pin)

    def _gather(self, which: np.ndarray, local: np.ndarray) -> torch.Tensor:
        """uint8 (N, C, H, W) of these (file, index) pairs, sorted by file: one fancy index per file, written
        straight into pinned memory on CUDA."""
        if self.sources[0].recipe.augment is not None:
            batch = torch.stack([self.sources[s].pixels(i) for s, i in zip(which, local, strict=True)])
            return batch.pin_memory() if self.pin else batch
        batch = torch.empty((len(local), *self.stores[0].shape), dtype=torch.uint8, pin_memory=self.pin)
        bounds = np.flatnonzero(np.diff(which)) + 1
        for start, end in zip([0, *bounds], [*bounds, len(which)], strict=True):
            np.take(self.stores[which[start]].batch_view(), local[start:end], axis=0, out=batch.numpy()[start:end],
                    mode="clip")  # clip: no bounds check, no buffered copy
        return batch


def _per_item(arrays: list[np.ndarray], which: np.ndarray, local: np.ndarray) -> np.ndarray:
    """arrays[which[i]][local[i]] for every item i."""
    out = np.empty(len(which), dtype=arrays[0].dtype if arrays else np.int64)
    for source, array in enumerate(arrays):
        mine = which == source
        out[mine] = array[local[mine]]
    return out


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                drop_last: bool = False, device: torch.device | str = "cpu") -> SkippingLoader | CachedLoader:
    """A loader whose shuffle order (and worker seeds) depend only on `seed`: every process that builds it with
    the same seed sees the same batches. Each pass over it draws the next order from the seeded generator.

    Cached datasets are read in this process (num_workers is not needed) and their batches arrive on `device`;
    other batches arrive on the CPU."""
    cached = _cached_parts(dataset)
    if cached is not None:
        return CachedLoader(*cached, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                            device=device)
    return SkippingLoader(DataLoader(
        _CatchUserErrors(dataset), batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        drop_last=drop_last, collate_fn=_collate, generator=torch.Generator().manual_seed(seed),
        worker_init_fn=die_with_parent if num_workers > 0 else None,
    ))
