"""Image loading with and without the decode-once cache, on generated DomainNet-like JPEGs.

    python benchmarks/data_loading.py                       # 200 images, 2 loader workers
    python benchmarks/data_loading.py --images 1000 --workers 8 --out benchmarks/results/data_loading.json

The images (300 to 1000 px wide, smooth random content, JPEG quality 90) are written to a temporary folder in the
DomainNet split-file layout and read through `build_federated_data` and `make_loader` with ViT-B/16's
preprocessing (bicubic resize to 248, centre crop 224, mean/std 0.5), as `lorafair fit` reads them. Every figure
is images per second per core used (the loader's main process counts as one core; n workers as n), and its ratio
to the PIL path with 0 workers measured in the same run. The cached rows read the whole set --epochs times in
shuffled training batches of --batch_size; the first PIL pass warms the page cache, so no row reads from disk.

Rows: the PIL path (decode, resize, crop, normalise every image at every read) with 0 and with n workers; building
the cache (n worker processes); reading it as uint8 batches (a GPU rank's CPU work: normalising runs on the GPU);
reading it as normalised float batches on the CPU; a local epoch of a small ViT (2 blocks, width 192, LoRA r 8) at
224 px on one core, fed by the PIL path (0 workers) and by the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorafair.config import ClientConfig, DataConfig, FederationConfig, LoraConfig, ModelConfig
from lorafair.data import build_federated_data, make_loader, model_data_config

CLASSES = 10


def write_domainnet_like(root: Path, count: int, seed: int = 0) -> None:
    """`count` JPEGs under root/clipart/<class>/ listed in root/splits/clipart_{train,test}.txt (all in train)."""
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(count):
        width = int(rng.integers(300, 1001))
        height = int(width * rng.uniform(0.6, 1.4))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height),
                                                                                          Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        relative = f"clipart/class_{index % CLASSES}/clipart_{index:06d}.jpg"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / relative, quality=90)
        lines.append(f"{relative} {index % CLASSES}")
    (root / "splits").mkdir(exist_ok=True)
    (root / "splits" / "clipart_train.txt").write_text("\n".join(lines) + "\n")
    (root / "splits" / "clipart_test.txt").write_text("\n".join(lines[:CLASSES]) + "\n")


def client_dataset(root: Path, cache: str, workers: int):
    data = DataConfig(name="domainnet", root=root, domains=["clipart"], num_classes=CLASSES, cache=cache,
                      num_workers=workers)
    data_config = model_data_config(ModelConfig(name="vit_base_patch16_224.augreg_in21k"))
    return build_federated_data(data, FederationConfig(), 0, data_config).clients[0].dataset


def images_per_second(loader, epochs: int) -> float:
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for images, _ in loader:
            seen += len(images)
    return seen / (time.perf_counter() - start)


def uint8_batches_per_second(loader, epochs: int) -> float:
    """The cached loader's CPU work on a GPU rank: one gather per batch into uint8, no normalising."""
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for positions in loader.order:
            order = np.lexsort((loader.local[positions], loader.which[positions]))
            seen += len(loader._gather(loader.which[positions][order], loader.local[positions][order]))
    return seen / (time.perf_counter() - start)


def local_epoch_per_second(loader, epochs: int) -> float:
    """Images/s of SGD steps of a small LoRA ViT at 224 px, data loading included."""
    from lorafair.models.image import LoraClassifier

    torch.manual_seed(0)
    model = LoraClassifier(ModelConfig(name="vit_base_patch16_224", kwargs={"depth": 2, "embed_dim": 192,
                                                                            "num_heads": 3}),
                           LoraConfig(r=8), CLASSES, ClientConfig())
    optimizer = model.configure_optimizers()
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for step, (images, labels) in enumerate(loader):
            loss = model.training_step((images, labels), step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(images)
    return seen / (time.perf_counter() - start)


def measure(root: Path, cache: Path, args: argparse.Namespace) -> list[tuple[str, int, float]]:
    """(row, cores, images/s) for every row."""
    batch, workers = args.batch_size, args.workers
    pil = client_dataset(root, "off", workers)
    images_per_second(make_loader(pil, batch, shuffle=True, seed=0, num_workers=0), 1)  # warm the page cache
    rows = [("PIL path, 0 workers", 1, images_per_second(make_loader(pil, batch, True, 0, 0), 1)),
            (f"PIL path, {workers} workers", workers, images_per_second(make_loader(pil, batch, True, 0, workers), 1))]
    cached = client_dataset(root, str(cache), workers)
    start = time.perf_counter()
    cached.dataset.datasets[0].store()
    rows.append((f"building the cache, {workers} workers", workers, len(cached) / (time.perf_counter() - start)))
    loader = make_loader(cached, batch, shuffle=True, seed=0, num_workers=0)
    rows.append(("cache: uint8 batches (GPU rank's CPU work)", 1, uint8_batches_per_second(loader, args.epochs)))
    rows.append(("cache: normalised float batches on CPU", 1, images_per_second(loader, args.epochs)))
    small = 32
    rows.append(("small ViT local epoch, PIL path, 0 workers", 1,
                 local_epoch_per_second(make_loader(pil, small, True, 0, 0), 1)))
    rows.append(("small ViT local epoch, cache", 1, local_epoch_per_second(make_loader(cached, small, True, 0, 0), 1)))
    return rows


def table(rows: list[tuple[str, int, float]]) -> str:
    reference = rows[0][2]
    lines = ["| path | cores | images/s | images/s per core | x PIL per core |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {cores} | {rate:,.0f} | {rate / cores:,.0f} | {rate / cores / reference:.1f} |"
              for name, cores, rate in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="PIL loader and cache-build worker processes")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10, help="passes over the cache for the cached-read rows")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "domainnet"
        write_domainnet_like(root, args.images)
        rows = measure(root, Path(folder) / "cache", args)
    print(f"{args.images} JPEGs, batch {args.batch_size}, torch threads 1, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} cores")
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"images": args.images, "workers": args.workers, "rows": [
            {"path": name, "cores": cores, "images_per_second": rate} for name, cores, rate in rows]}, indent=1))


if __name__ == "__main__":
    main()
