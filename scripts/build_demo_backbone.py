"""Pretrain the demo's small ViT on the reserved digits and write lorafair/assets/demo_vit.{safetensors,json}.

The demo fine-tunes a "foundation model" offline, so the repository ships one: a tiny timm ViT trained with labels on
the digits reserved for it (index % 7 == 0 in scikit-learn's load_digits, plain style), which no client domain
contains. Random shifts, rotations, scales and inversions stand in for a large pretraining set. Seeded; a few
minutes on one CPU core:

    python scripts/build_demo_backbone.py            # --epochs, --seed, --out-dir to change the defaults
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
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torchvision.transforms import v2

from lorafair.data.digits import RESERVED_EVERY, pretraining_set, render

MODEL_NAME = "vit_tiny_patch16_224"
ARCHITECTURE = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}
"""timm kwargs of the demo backbone. Patches of 8 pixels (a 4 x 4 grid) keep it fast on a CPU; each patch still
sees 2 x 2 of the digits' 8 x 8 source pixels, so nothing is lost."""
ASSETS = Path(__file__).resolve().parents[1] / "lorafair" / "assets"


def augment(images: Tensor, affine: v2.Transform) -> Tensor:
    """Random views of the digits (N, 3, H, W) in [0, 1]: per image a small shift/rotation/scale (no flips: a
    mirrored 2 is not a 2), and half of them inverted (dark ink on a light ground), as broad data would show them."""
    views = torch.stack([affine(image) for image in images])
    inverted = torch.rand(len(views), 1, 1, 1) < 0.5
    return torch.where(inverted, 1 - views, views)


AFFINE = {"degrees": 10, "translate": (0.05, 0.05), "scale": (0.9, 1.1)}


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model((batch - mean) / std).argmax(-1) for batch in images.split(256)])
    return (predictions == labels).float().mean().item()


def other_plain_digits(image_size: int) -> tuple[Tensor, Tensor]:
    """The non-reserved digits in the plain style: only evaluated, to record how well the features generalise."""
    digits = load_digits()
    keep = torch.arange(len(digits.target)) % RESERVED_EVERY != 0
    ink = torch.as_tensor(digits.images, dtype=torch.float32)[keep] / 16
    return render(ink, "plain", (image_size, image_size), torch.Generator()), torch.as_tensor(digits.target)[keep]


def pretrain(epochs: int, seed: int, batch_size: int = 16, lr: float = 1e-3, warmup_steps: int = 50,
             weight_decay: float = 0.05) -> tuple[nn.Module, dict]:
    """Supervised AdamW training, linear warm-up then cosine decay; returns the model and how it was made.

    Small batches matter here: a ViT learns slowly from 257 images, and more steps per epoch is what helps most.
    """
    torch.set_num_threads(1)  # the model is so small that a second thread costs more than it saves
    lightning.seed_everything(seed, verbose=False)
    images, labels = pretraining_set(image_size=ARCHITECTURE["img_size"])
    model = timm.create_model(MODEL_NAME, pretrained=False, num_classes=10, **ARCHITECTURE)
    data_config = timm.data.resolve_data_config(model=model)
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(labels) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    affine = v2.RandomAffine(**AFFINE)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(labels)).split(batch_size):
            loss = F.cross_entropy(model((augment(images[batch], affine) - mean) / std), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 25 == 0:
            print(f"epoch {epoch + 1}/{epochs}  train accuracy {accuracy(model, images, labels, mean, std):.3f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    other_images, other_labels = other_plain_digits(ARCHITECTURE["img_size"])
    record = {
        "model_name": MODEL_NAME,
        "kwargs": ARCHITECTURE,
        "num_classes": 10,
        "data": f"load_digits() images with index % {RESERVED_EVERY} == 0, plain style, {ARCHITECTURE['img_size']} px "
                f"({len(labels)} images, from lorafair.data.digits.pretraining_set; in no demo client domain)",
        "augmentation": f"per image RandomAffine({AFFINE}), then inverted with probability 0.5",
        "training": f"AdamW lr {lr}, weight decay {weight_decay}, {warmup_steps} warm-up steps then cosine decay, "
                    f"batch {batch_size}, {epochs} epochs ({steps} steps)",
        "normalisation": {"mean": list(data_config["mean"]), "std": list(data_config["std"])},
        "seed": seed,
        "train_accuracy": round(accuracy(model, images, labels, mean, std), 4),
        "accuracy_on_the_other_plain_digits": round(accuracy(model, other_images, other_labels, mean, std), 4),
        "accuracy_on_the_other_digits_inverted": round(accuracy(model, 1 - other_images, other_labels, mean, std), 4),
        "train_seconds": round(seconds, 1),
        "built_with": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "command": f"python scripts/build_demo_backbone.py --epochs {epochs} --seed {seed}",
    }
    return model, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ASSETS)
    args = parser.parse_args()
    model, record = pretrain(args.epochs, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # The head is kept so the pretraining accuracy can be checked; loading it as a backbone drops it.
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, args.out_dir / "demo_vit.safetensors", metadata={"model_name": MODEL_NAME})
    (args.out_dir / "demo_vit.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
