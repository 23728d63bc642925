"""Pretrain the shapes benchmark's small ViT and write lorafair/assets/shapes_vit.{safetensors,json}.

The demo fine-tunes a "foundation model" offline, so the repository ships one: a tiny timm ViT trained with labels on
lorafair.data.shapes.PRETRAINING_CLASSES, a family of procedural shapes disjoint from the benchmark's classes, drawn
in a neutral grey style (random grey levels) that is none of the benchmark's six domains. Every step
draws a fresh batch from a seeded stream, so the run is deterministic: with the same torch build, a rebuild writes
the same bytes. A few minutes on one CPU core:

    python scripts/build_shapes_backbone.py            # --steps, --seed, --out-dir to change the defaults
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import lightning
import timm
import timm.data
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from lorafair.data.shapes import PRETRAINING_CLASSES, pretraining_batch

MODEL_NAME = "vit_tiny_patch16_224"
ARCHITECTURE = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}
"""timm kwargs of the backbone, the same as the digits demo's: patches of 8 pixels (a 4 x 4 grid) keep it fast on a
CPU."""
ASSETS = Path(__file__).resolve().parents[1] / "lorafair" / "assets"
NAME = "shapes_vit"
HELD_OUT_SEED = 10_000
"""Seed offset of the stream that draws the held-out images the accuracy is measured on."""


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model((batch - mean) / std).argmax(-1) for batch in images.split(256)])
    return (predictions == labels).float().mean().item()


def pretrain(steps: int, seed: int, batch_size: int = 64, lr: float = 2e-3, warmup_steps: int = 100,
             weight_decay: float = 0.05) -> tuple[nn.Module, dict]:
    """Supervised AdamW training on fresh batches, linear warm-up then cosine decay; returns the model and how it
    was made."""
    torch.set_num_threads(1)  # the model is so small that a second thread costs more than it saves
    lightning.seed_everything(seed, verbose=False)
    size = ARCHITECTURE["img_size"]
    model = timm.create_model(MODEL_NAME, pretrained=False, num_classes=len(PRETRAINING_CLASSES), **ARCHITECTURE)
    data_config = timm.data.resolve_data_config(model=model)
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    stream = torch.Generator().manual_seed(seed)
    held_out = pretraining_batch(2000, size, torch.Generator().manual_seed(seed + HELD_OUT_SEED))
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        images, labels = pretraining_batch(batch_size, size, stream)
        loss = F.cross_entropy(model((images - mean) / std), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 500 == 0:
            print(f"step {step + 1}/{steps}  held-out accuracy {accuracy(model, *held_out, mean, std):.3f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            model.train()
    seconds = time.perf_counter() - start
    record = {
        "model_name": MODEL_NAME,
        "kwargs": ARCHITECTURE,
        "num_classes": len(PRETRAINING_CLASSES),
        "classes": list(PRETRAINING_CLASSES),
        "data": f"lorafair.data.shapes.pretraining_batch: shapes of PRETRAINING_CLASSES (none of the benchmark's "
                f"classes) in the neutral 'plain' style (random grey ink and ground), {size} px, a fresh "
                f"batch every step from torch.Generator().manual_seed({seed})",
        "training": f"AdamW lr {lr}, weight decay {weight_decay}, {warmup_steps} warm-up steps then cosine decay, "
                    f"batch {batch_size}, {steps} steps ({steps * batch_size} images)",
        "normalisation": {"mean": list(data_config["mean"]), "std": list(data_config["std"])},
        "seed": seed,
        "held_out_accuracy": round(accuracy(model, *held_out, mean, std), 4),
        "held_out": f"2000 images from torch.Generator().manual_seed({seed + HELD_OUT_SEED})",
        "built_with": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "command": f"python scripts/build_shapes_backbone.py --steps {steps} --seed {seed}",
    }
    print(f"trained in {seconds:.0f} s", flush=True)
    return model, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ASSETS)
    args = parser.parse_args()
    model, record = pretrain(args.steps, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # The head is kept so the pretraining accuracy can be checked; loading it as a backbone drops it.
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, args.out_dir / f"{NAME}.safetensors", metadata={"model_name": MODEL_NAME})
    (args.out_dir / f"{NAME}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
