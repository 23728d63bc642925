"""What a checkpoint remembers of the data and the weights behind a config, beside its settings, so a resume
notices when they changed.

Three labels, each cheap to recompute on every start (one stat per file, no file is read):
- partition: client count, sample count and a hash of every client's (id, domain, size, class counts);
- data: a hash of every training and test sample in order, as (path, size in bytes, modification time, label) for
  image files (decoded with PIL or read from the image cache alike), or the label for the generated digits (their
  pixels follow from the seed);
- weights: the model.weights file's name, size and modification time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset, Subset

from lorafair.config import ModelConfig
from lorafair.data import FederatedData
from lorafair.data.cache import CachedImageDataset
from lorafair.data.image_files import ImageFileDataset
from lorafair.weights import resolve_weights_path


def run_fingerprints(data: FederatedData, model_cfg: ModelConfig) -> dict[str, str]:
    """The labels a checkpoint stores beside the settings; see the module docstring."""
    return {"partition": partition_fingerprint((c.id, c.domain, c.num_samples, c.class_counts) for c in data.clients),
            "data": data_fingerprint([*(client.dataset for client in data.clients), *data.test.values()]),
            "weights": weights_fingerprint(model_cfg.weights)}


def partition_fingerprint(clients: Iterable[tuple[int, str, int, list[int]]]) -> str:
    """A short label of the client partition: client count, sample count and a hash of every client's
    (id, domain, num_samples, class_counts)."""
    clients = [(int(i), str(domain), int(size), [int(c) for c in counts]) for i, domain, size, counts in clients]
    digest = hashlib.sha256(repr(clients).encode()).hexdigest()[:12]
    return f"{len(clients)} clients, {sum(size for _, _, size, _ in clients)} samples, sha256 {digest}"


def data_fingerprint(datasets: Iterable[Dataset]) -> str:
    """'N samples, sha256 X' over the samples of `datasets` in order (see the module docstring)."""
    digest, count, cache = hashlib.sha256(), 0, {}
    for dataset in datasets:
        for record in _records(dataset, cache):
            digest.update(repr(record).encode())
            count += 1
    return f"{count} samples, sha256 {digest.hexdigest()[:12]}"


def _records(dataset: Dataset, cache: dict[int, list]) -> Iterator[tuple]:
    """One record per sample. Clients are subsets of one shared training set, whose records are built once."""
    if isinstance(dataset, Subset):
        if id(dataset.dataset) not in cache:
            cache[id(dataset.dataset)] = list(_records(dataset.dataset, cache))
        base = cache[id(dataset.dataset)]
        yield from (base[index] for index in dataset.indices)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            yield from _records(part, cache)
    elif isinstance(dataset, ImageFileDataset | CachedImageDataset):
        for path, label in zip(dataset.paths, dataset.labels.tolist(), strict=True):
            stat = os.stat(path)
            yield path, stat.st_size, stat.st_mtime_ns, label
    else:  # in-memory data generated from the seed: its labels
        yield from ((int(label),) for label in dataset.labels)


def weights_fingerprint(weights: Path | None) -> str:
    """'NAME, SIZE bytes, modified T' of the weight file, or 'none' without one (random init or the hub)."""
    if weights is None:
        return "none"
    path = resolve_weights_path(Path(weights))
    stat = path.stat()
    return f"{path.name}, {stat.st_size} bytes, modified {stat.st_mtime_ns}"
