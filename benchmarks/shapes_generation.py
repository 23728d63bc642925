"""How long the shapes benchmark (data.name shapes, the demo's data) takes to generate on one core.

    python benchmarks/shapes_generation.py                  # default sizes: 6 domains x (240 train + 2,000 test)
    python benchmarks/shapes_generation.py --repeats 5 --out benchmarks/results/shapes_generation.json

Times `build_domains` at 32 px (the demo's input size) with one torch thread, best and median of --repeats, and the
images per second; the set is drawn again from the seed at every `lorafair fit` start, so this is part of every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lorafair.data.shapes import DOMAINS, build_domains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_config = {"input_size": (3, args.image_size, args.image_size), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    seconds = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        domains = build_domains(repeat, data_config)
        seconds.append(time.perf_counter() - start)
    images = sum(len(domain.train) + len(domain.test) for domain in domains)
    result = {"domains": len(DOMAINS), "images": images, "image_size": args.image_size, "threads": 1,
              "best_seconds": round(min(seconds), 3), "median_seconds": round(statistics.median(seconds), 3),
              "images_per_second": round(images / min(seconds)),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "processor": platform.processor() or platform.machine()}}
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
