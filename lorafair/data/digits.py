"""The embedded demo set: scikit-learn's 1,797 handwritten 8x8 digits, restyled into six visual domains.

It needs no network and no files, so the demo and the tests run anywhere. Every image index with i % 7 == 0 is
reserved for pretraining the shipped demo backbone and never appears in a domain; the other images are shuffled
by the run seed into six disjoint domains, each drawn in its own style and split into train and test.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lorafair.errors import UserError

DOMAINS = ("plain", "inverted", "rotated", "blurred", "noisy", "coloured")
CLASSES = tuple(str(digit) for digit in range(10))
RESERVED_EVERY = 7
"""Images whose index in load_digits() is a multiple of this are the backbone's pretraining pool."""


@functools.cache
def _load() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ink intensity in [0, 1], shape (N, 8, 8), and their labels (read once; never modified)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def _upsample(ink: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, 8, 8) ink -> (N, 1, H, W) by bilinear interpolation."""
    return F.interpolate(ink[:, None], size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def render(ink: Tensor, style: str, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Draw (N, 8, 8) ink maps at `size` in one domain's style: float (N, 3, H, W) in [0, 1].

    The styles change colour, orientation, sharpness or noise but keep the digit's shape readable.
    """
    gray = _upsample(ink, size)
    if style == "plain":
        out = gray.expand(-1, 3, -1, -1)
    elif style == "inverted":
        out = (1 - gray).expand(-1, 3, -1, -1)
    elif style == "rotated":
        out = torch.rot90(gray, k=1, dims=(2, 3)).expand(-1, 3, -1, -1)
    elif style == "blurred":
        sigma = 0.6 * size[0] / 8  # 0.6 source pixels
        kernel = 2 * round(2 * sigma) + 1
        out = TF.gaussian_blur(gray, [kernel, kernel], [sigma, sigma]).expand(-1, 3, -1, -1)
    elif style == "noisy":
        noise = 0.3 * torch.randn(gray.shape[0], 3, *size, generator=generator)
        out = (gray + noise).clamp(0, 1)
    elif style == "coloured":
        background = 0.5 * torch.rand(gray.shape[0], 3, 1, 1, generator=generator)
        ink_colour = 0.6 + 0.4 * torch.rand(gray.shape[0], 3, 1, 1, generator=generator)
        out = background * (1 - gray) + ink_colour * gray
    else:
        raise ValueError(f"unknown digits style {style!r}; expected one of {', '.join(DOMAINS)}")
    return out.contiguous()


def pretraining_set(image_size: int = 32) -> tuple[Tensor, Tensor]:
    """The reserved images (index % 7 == 0) in the plain style: float32 (N, 3, H, W) in [0, 1], not normalised,
    and int64 labels. No domain of the demo set contains any of them."""
    images, labels = _load()
    reserved = torch.arange(len(labels)) % RESERVED_EVERY == 0
    pixels = render(images[reserved], "plain", (image_size, image_size), torch.Generator().manual_seed(0))
    return pixels, labels[reserved]


class DigitsDataset(Dataset):
    """In-memory styled digits. Pixels are kept as uint8 (a quarter of the memory) and normalised per item."""

    def __init__(self, pixels: Tensor, labels: Tensor, source_indices: Tensor, mean: Sequence[float],
                 std: Sequence[float], augment: v2.Transform | None = None) -> None:
        self.pixels = (pixels * 255).round().to(torch.uint8)
        self.labels = labels
        self.source_indices = source_indices
        """Index of every image in load_digits(), to check that domains never share a source image."""
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.pixels[index].float() / 255
        if self.augment is not None:
            image = self.augment(image)
        return (image - self.mean) / self.std, int(self.labels[index])


@dataclass
class DigitsDomain:
    name: str
    train: DigitsDataset
    test: DigitsDataset


def build_domains(seed: int, test_fraction: float, data_config: dict, domains: Sequence[str] | None = None,
                  num_classes: int | None = None, augment: bool = False) -> list[DigitsDomain]:
    """Shuffle the non-reserved digits by `seed` into six disjoint domains, render each in its style at the
    data config's input size, and split each into train and test. `domains` picks and orders a subset by name;
    `num_classes` keeps the digits below it."""
    images, labels = _load()
    size = tuple(data_config["input_size"][1:])
    generator = torch.Generator().manual_seed(seed)
    pool = torch.nonzero(torch.arange(len(labels)) % RESERVED_EVERY != 0).squeeze(1)
    pool = pool[torch.randperm(len(pool), generator=generator)]
    chunks = dict(zip(DOMAINS, torch.tensor_split(pool, len(DOMAINS)), strict=True))
    # Small crops only, no flips: a mirrored digit is another symbol.
    augment_transform = v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True) if augment else None
    built = []
    for name in DOMAINS if domains is None else domains:
        if name not in chunks:
            raise UserError(f"data.domains: digits has no domain {name!r}; choose from {', '.join(DOMAINS)}")
        style_generator = torch.Generator().manual_seed(seed * 1000 + DOMAINS.index(name))
        indices = chunks[name]
        if num_classes is not None:
            indices = indices[labels[indices] < num_classes]
        pixels = render(images[indices], name, size, style_generator)
        num_test = max(1, round(test_fraction * len(indices)))
        parts = {"test": slice(0, num_test), "train": slice(num_test, None)}
        datasets = {split: DigitsDataset(pixels[part], labels[indices[part]], indices[part], data_config["mean"],
                                         data_config["std"], augment_transform if split == "train" else None)
                    for split, part in parts.items()}
        built.append(DigitsDomain(name, datasets["train"], datasets["test"]))
    return built


def save_preview(path: Path, seed: int = 0, image_size: int = 32, per_domain: int = 10) -> None:
    """A PNG grid with one row per domain (the first `per_domain` training images, unnormalised) to see the styles."""
    from torchvision.utils import save_image

    data_config = {"input_size": (3, image_size, image_size), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    rows = [torch.stack([domain.train[i][0] for i in range(per_domain)]) for domain in build_domains(seed, 0.2,
                                                                                                     data_config)]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(rows), path, nrow=per_domain, padding=2, pad_value=0.5)
