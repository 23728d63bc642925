"""The offline benchmark: procedural shapes drawn in six DomainNet-like domains, generated from the run seed.

Twenty classes of shapes (polygons, stars, rings, crosses, arrows, letter-like glyphs, ...) are drawn with a random
position, scale, rotation and colour per image, in six visual domains named after DomainNet's: photo (a textured,
shaded object on a textured background), sketch (dark edges on white), clipart (flat colours with an outline),
painting (blurred, brush-like colour noise), quickdraw (thin, jittery, partly missing strokes) and infograph (a
smaller object among distractor blocks and lines of "text").

Why it is shaped this way: the demo must be able to rank federated LoRA methods on a laptop CPU. So
- every domain has a large test set (DEFAULT_TEST_PER_CLASS x 20 = 2,000 images: one point of accuracy is about 20
  images, and the test-sampling standard deviation of a domain's accuracy is about one point);
- every domain has a small training set (DEFAULT_TRAIN_PER_CLASS images per class): one client alone overfits its
  domain, so federation has something to give, and the clients' updates differ (they see different styles), so how
  the server aggregates them matters;
- the shipped backbone (scripts/build_shapes_backbone.py) is pretrained on PRETRAINING_CLASSES, another family of
  shapes in a neutral style, disjoint from CLASSES: its features transfer, but the classes and the domains have to
  be learned.
Everything is vectorised in torch (signed distance fields evaluated on the pixel grid), so the whole set is made in
a few seconds on one core; no download and no file. Train and test come from separate random streams of the seed,
so the test set does not change with the training size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lorafair.data.digits import DigitsDataset
from lorafair.errors import UserError

DOMAINS = ("photo", "sketch", "clipart", "painting", "quickdraw", "infograph")
DEFAULT_TRAIN_PER_CLASS = 12
"""Training images per class and domain: few, so that one domain alone is not enough."""
DEFAULT_TEST_PER_CLASS = 100
"""Test images per class and domain: 2,000 per domain."""

Sdf = Callable[[Tensor, Tensor], Tensor]
"""A shape: signed distance (negative inside) at local coordinates (u, v), the shape spanning about [-1, 1]^2."""


# ---------------------------------------------------------------------------------------------------------------
# Signed distance primitives, all elementwise over tensors of coordinates.

def _circle(radius: float, cx: float = 0.0, cy: float = 0.0) -> Sdf:
    return lambda u, v: torch.hypot(u - cx, v - cy) - radius


def _box(hx: float, hy: float, cx: float = 0.0, cy: float = 0.0) -> Sdf:
    def sdf(u: Tensor, v: Tensor) -> Tensor:
        qx, qy = (u - cx).abs() - hx, (v - cy).abs() - hy
        return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)
    return sdf


def _convex(points: Sequence[tuple[float, float]]) -> Sdf:
    """A convex polygon, vertices counter-clockwise: the largest signed distance to its edges' lines."""
    edges = []
    for (x0, y0), (x1, y1) in zip(points, [*points[1:], points[0]], strict=True):
        length = math.hypot(x1 - x0, y1 - y0)
        nx, ny = (y1 - y0) / length, -(x1 - x0) / length  # outward normal of a counter-clockwise edge
        edges.append((nx, ny, nx * x0 + ny * y0))

    def sdf(u: Tensor, v: Tensor) -> Tensor:
        return torch.stack([nx * u + ny * v - c for nx, ny, c in edges]).amax(0)
    return sdf


def _regular(sides: int, radius: float, phase: float = math.pi / 2) -> Sdf:
    return _convex([(radius * math.cos(phase + 2 * math.pi * k / sides), radius * math.sin(phase + 2 * math.pi * k /
                                                                                             sides))
                    for k in range(sides)])


def _star(points: int, inner: float, outer: float) -> Sdf:
    """A star as a polar outline with straight-ish spikes; the distance is approximated radially."""
    def sdf(u: Tensor, v: Tensor) -> Tensor:
        angle = torch.atan2(v, u) - math.pi / 2
        wave = (angle * points / (2 * math.pi)).remainder(1.0)
        radius = inner + (outer - inner) * (1 - 2 * (wave - 0.5).abs())
        return (torch.hypot(u, v) - radius) * 0.6
    return sdf


def _strokes(points: Sequence[tuple[float, float]], width: float = 0.16, closed: bool = False) -> Sdf:
    """A polyline of the given half width."""
    pairs = list(itertools.pairwise(points)) + ([(points[-1], points[0])] if closed else [])
    return _segments(pairs, width)


def _segments(pairs: Sequence[tuple[tuple[float, float], tuple[float, float]]], width: float = 0.16) -> Sdf:
    def sdf(u: Tensor, v: Tensor) -> Tensor:
        distances = []
        for (ax, ay), (bx, by) in pairs:
            dx, dy = bx - ax, by - ay
            t = (((u - ax) * dx + (v - ay) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
            distances.append(torch.hypot(u - ax - t * dx, v - ay - t * dy))
        return torch.stack(distances).amin(0) - width
    return sdf


def _union(*shapes: Sdf) -> Sdf:
    return lambda u, v: torch.stack([shape(u, v) for shape in shapes]).amin(0)


def _minus(shape: Sdf, hole: Sdf) -> Sdf:
    return lambda u, v: torch.maximum(shape(u, v), -hole(u, v))


def _outline(shape: Sdf, width: float = 0.14) -> Sdf:
    return lambda u, v: shape(u, v).abs() - width


# ---------------------------------------------------------------------------------------------------------------
# The classes. v points up (rows are flipped when drawn).

_SHAPES: dict[str, Sdf] = {
    "triangle": _regular(3, 1.0),
    "square": _regular(4, 0.95, math.pi / 4),
    "pentagon": _regular(5, 0.95),
    "hexagon": _regular(6, 0.95, 0.0),
    "disk": _circle(0.85),
    "ring": _outline(_circle(0.72), 0.16),
    "star": _star(5, 0.42, 1.0),
    "four_point_star": _star(4, 0.3, 1.0),
    "plus": _union(_box(0.95, 0.24), _box(0.24, 0.95)),
    "arrow": _union(_box(0.55, 0.17, -0.35, 0.0), _convex([(0.1, -0.6), (0.95, 0.0), (0.1, 0.6)])),
    "crescent": _minus(_circle(0.9), _circle(0.72, 0.45, 0.1)),
    "half_disk": _minus(_circle(0.95, 0.0, -0.35), _box(1.0, 0.6, 0.0, -0.95)),
    "letter_l": _strokes([(-0.5, 0.9), (-0.5, -0.8), (0.6, -0.8)]),
    "letter_t": _segments([((-0.8, 0.8), (0.8, 0.8)), ((0.0, 0.8), (0.0, -0.9))]),
    "letter_h": _segments([((-0.65, 0.9), (-0.65, -0.9)), ((0.65, 0.9), (0.65, -0.9)), ((-0.65, 0.0), (0.65, 0.0))]),
    "letter_z": _strokes([(-0.7, 0.8), (0.7, 0.8), (-0.7, -0.8), (0.7, -0.8)]),
    "letter_e": _segments([((-0.6, 0.85), (-0.6, -0.85)), ((-0.6, 0.85), (0.6, 0.85)), ((-0.6, 0.0), (0.4, 0.0)),
                           ((-0.6, -0.85), (0.6, -0.85))]),
    "square_outline": _outline(_regular(4, 0.9, math.pi / 4), 0.13),
    "equals": _union(_box(0.85, 0.17, 0.0, 0.4), _box(0.85, 0.17, 0.0, -0.4)),
    "zigzag": _strokes([(-0.9, -0.5), (-0.45, 0.5), (0.0, -0.5), (0.45, 0.5), (0.9, -0.5)], 0.14),
    # The pretraining family: none of the above.
    "ellipse": lambda u, v: (torch.hypot(u / 0.95, v / 0.5) - 1) * 0.5,
    "trapezoid": _convex([(-0.95, -0.6), (0.95, -0.6), (0.45, 0.6), (-0.45, 0.6)]),
    "rhombus": _convex([(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]),
    "six_point_star": _star(6, 0.5, 1.0),
    "octagon_outline": _outline(_regular(8, 0.9, math.pi / 8), 0.13),
    "x_cross": _segments([((-0.75, -0.75), (0.75, 0.75)), ((-0.75, 0.75), (0.75, -0.75))], 0.18),
    "double_arrow": _union(_box(0.4, 0.14), _convex([(-0.35, -0.5), (-0.35, 0.5), (-1.0, 0.0)]),
                           _convex([(0.35, 0.5), (0.35, -0.5), (1.0, 0.0)])),
    "arc": _minus(_outline(_circle(0.7), 0.15), _box(1.0, 0.5, 0.0, 0.75)),
    "letter_f": _segments([((-0.5, 0.85), (-0.5, -0.9)), ((-0.5, 0.85), (0.6, 0.85)), ((-0.5, 0.05), (0.35, 0.05))]),
    "letter_k": _segments([((-0.5, 0.9), (-0.5, -0.9)), ((-0.5, 0.0), (0.6, 0.9)), ((-0.3, 0.15), (0.6, -0.9))]),
    "letter_n": _strokes([(-0.6, -0.9), (-0.6, 0.9), (0.6, -0.9), (0.6, 0.9)], 0.14),
    "letter_v": _strokes([(-0.75, 0.9), (0.0, -0.85), (0.75, 0.9)]),
    "letter_y": _segments([((-0.7, 0.9), (0.0, 0.05)), ((0.7, 0.9), (0.0, 0.05)), ((0.0, 0.05), (0.0, -0.9))]),
    "three_dots": _union(_circle(0.28, -0.6, -0.35), _circle(0.28, 0.6, -0.35), _circle(0.28, 0.0, 0.55)),
    "dumbbell": _union(_circle(0.38, -0.6, 0.0), _circle(0.38, 0.6, 0.0), _box(0.6, 0.12)),
    "hourglass": _union(_convex([(-0.7, 0.9), (0.0, 0.0), (0.7, 0.9)]), _convex([(-0.7, -0.9), (0.7, -0.9),
                                                                                (0.0, 0.0)])),
    "keyhole": _union(_circle(0.45, 0.0, 0.35), _convex([(-0.4, -0.95), (0.4, -0.95), (0.12, 0.2), (-0.12, 0.2)])),
    "bars": _union(_box(0.14, 0.85, -0.55), _box(0.14, 0.85, 0.0), _box(0.14, 0.85, 0.55)),
    "frame_corner": _strokes([(-0.8, 0.2), (-0.8, -0.8), (0.2, -0.8)], 0.14),
    "triangle_outline": _outline(_regular(3, 0.95), 0.13),
}
CLASSES = tuple(list(_SHAPES)[:20])
"""The benchmark's classes; label i is CLASSES[i]."""
PRETRAINING_CLASSES = tuple(list(_SHAPES)[20:])
"""The shipped backbone's classes, disjoint from CLASSES."""


# ---------------------------------------------------------------------------------------------------------------
# Drawing.

def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel centres in [-1, 1], x to the right and y up, shape (size, size)."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(-axis, axis, indexing="ij")
    return x, y


def signed_distance(labels: Tensor, classes: Sequence[str], size: int, generator: torch.Generator, scale: tuple[
        float, float] = (0.45, 0.7), max_rotation: float = 0.5, max_shift: float = 0.22) -> Tensor:
    """For each label a shape of classes[label] at a random scale, rotation (radians) and position: the signed
    distance (N, size, size) in image coordinates ([-1, 1] across the image)."""
    n = len(labels)
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator)
    angle = max_rotation * (2 * torch.rand(n, generator=generator) - 1)
    shift = max_shift * (2 * torch.rand(n, 2, generator=generator) - 1)
    x, y = _grid(size)
    dx, dy = x - shift[:, 0, None, None], y - shift[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = (cos * dx + sin * dy) / s[:, None, None], (-sin * dx + cos * dy) / s[:, None, None]
    distance = torch.empty(n, size, size)
    for label in labels.unique().tolist():
        rows = labels == label
        distance[rows] = _SHAPES[classes[label]](u[rows], v[rows]) * s[rows, None, None]
    return distance


def _fill(distance: Tensor) -> Tensor:
    """Antialiased inside mask (N, 1, H, W)."""
    pixel = 2 / distance.shape[-1]
    return (0.5 - distance / pixel).clamp(0, 1)[:, None]


def _edge(distance: Tensor, width_pixels: float | Tensor) -> Tensor:
    """Antialiased outline of `width_pixels` (a number, or one per image as (N, 1, 1)): (N, 1, H, W)."""
    pixel = 2 / distance.shape[-1]
    return (0.5 + width_pixels / 2 - distance.abs() / pixel).clamp(0, 1)[:, None]


def _smooth_noise(n: int, channels: int, cells: int, size: int, generator: torch.Generator) -> Tensor:
    """Random values on a cells x cells grid, bicubically upsampled: low-frequency noise in about [0, 1]."""
    coarse = torch.rand(n, channels, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def _colours(n: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(n, 3, 1, 1, generator=generator)


def _gray(image: Tensor) -> Tensor:
    return image.mean(1, keepdim=True).expand(-1, 3, -1, -1)


def _photo(labels: Tensor, classes: Sequence[str], size: int, generator: torch.Generator) -> Tensor:
    """A textured shape on a noisy ground of another colour, lit from one side."""
    n, rand = len(labels), partial(torch.rand, generator=generator)
    distance = signed_distance(labels, classes, size, generator)
    inside = _fill(distance)
    base = _colours(n, generator, 0.1, 0.9)
    background = (0.65 * base + 0.35 * _smooth_noise(n, 3, 4, size, generator)
                  + 0.12 * (rand(n, 3, size, size) - 0.5))
    x, y = _grid(size)
    direction = 2 * math.pi * rand(n, 1, 1, 1)
    frequency = 4 + 6 * rand(n, 1, 1, 1)
    stripes = torch.sin(frequency * (x * torch.cos(direction) + y * torch.sin(direction)) + 6 * rand(n, 1, 1, 1))
    light = 0.75 + 0.25 * (x * torch.cos(direction + 1) + y * torch.sin(direction + 1))
    colour = 0.6 * (1 - base) + 0.4 * _colours(n, generator, 0.1, 0.9)  # apart from the ground
    texture = colour * light * (0.8 + 0.2 * stripes) + 0.1 * (rand(n, 3, size, size) - 0.5)
    return background * (1 - inside) + texture * inside


def _sketch(labels: Tensor, classes: Sequence[str], size: int, generator: torch.Generator) -> Tensor:
    """A pencil outline on paper."""
    n, rand = len(labels), partial(torch.rand, generator=generator)
    distance = signed_distance(labels, classes, size, generator)
    line = _edge(distance, 1.0 + 0.6 * rand(n, 1, 1))
    paper = 0.93 + 0.07 * rand(n, 1, 1, 1) + 0.04 * (rand(n, 1, size, size) - 0.5)
    return (paper * (1 - 0.85 * line)).expand(-1, 3, -1, -1)


def _clipart(labels: Tensor, classes: Sequence[str], size: int, generator: torch.Generator) -> Tensor:
    """A saturated flat shape on a light ground, mostly outlined in black."""
    n, rand = len(labels), partial(torch.rand, generator=generator)
    distance = signed_distance(labels, classes, size, generator)
    inside, outline = _fill(distance), _edge(distance, 1.0)
    background = _colours(n, generator, 0.55, 1.0)
    colour = _colours(n, generator)
    colour = colour / colour.amax(1, keepdim=True).clamp(min=0.2)  # saturated
    out = background * (1 - inside) + colour * inside
    return out * (1 - outline * (rand(n, 1, 1, 1) < 0.7))


def _painting(labels: Tensor, classes: Sequence[str], size: int, generator: torch.Generator) -> Tensor:
    """Blurred soft colours, the shape against the ground."""
    n = len(labels)
    distance = signed_distance(labels, classes, size, generator)
    inside = TF.gaussian_blur(_fill(distance), [5, 5], [0.7, 0.7])
    base = _colours(n, generator, 0.2, 0.8)
    background = 0.7 * base + 0.3 * _smooth_noise(n, 3, 8, size, generator)
    colour = 0.8 * (1 - base) + 0.2 * _smooth_noise(n, 3, 6, size, generator)  # against the ground
    return TF.gaussian_blur(background * (1 - inside) + colour * inside, [5, 5], [0.7, 0.7])


def _quickdraw(labels: Tensor, classes: Sequence[str], size: int, generator: torch.Generator) -> Tensor:
    """A wobbly outline, often with a gap, on white."""
    n, rand = len(labels), partial(torch.rand, generator=generator)
    x, y = _grid(size)
    jitter = 0.12 * (_smooth_noise(n, 1, 5, size, generator)[:, 0] - 0.5)
    distance = signed_distance(labels, classes, size, generator) + jitter
    line = _edge(distance, 0.8)
    start = 2 * math.pi * rand(n, 1, 1, 1)
    gap = torch.where(rand(n, 1, 1, 1) < 0.6, 1.6 * rand(n, 1, 1, 1), torch.zeros(n, 1, 1, 1))
    angle = (torch.atan2(y, x)[None, None] - start).remainder(2 * math.pi)
    return (1 - line * (angle >= gap)).expand(-1, 3, -1, -1)


def _infograph(labels: Tensor, classes: Sequence[str], size: int, generator: torch.Generator) -> Tensor:
    """A shape among coloured blocks and lines of "text"."""
    n, rand = len(labels), partial(torch.rand, generator=generator)
    background = _colours(n, generator, 0.6, 1.0)
    out = background.expand(-1, 3, size, size).clone()
    x, y = _grid(size)
    for _ in range(4):  # distractor blocks and lines of "text"
        centre = 2 * rand(n, 2, 1, 1) - 1
        half = torch.where(rand(n, 1, 1, 1) < 0.5, torch.cat([0.1 + 0.25 * rand(n, 1, 1, 1),
                                                               0.02 + 0.03 * rand(n, 1, 1, 1)], 1),
                           0.05 + 0.2 * rand(n, 2, 1, 1))
        block = ((x - centre[:, :1]).abs() < half[:, :1]) & ((y - centre[:, 1:]).abs() < half[:, 1:])
        out = torch.where(block, _colours(n, generator), out)
    distance = signed_distance(labels, classes, size, generator, scale=(0.45, 0.62), max_shift=0.3)
    inside = _fill(distance)
    return out * (1 - inside) + _colours(n, generator, 0.0, 0.7) * inside


def _plain(labels: Tensor, classes: Sequence[str], size: int, generator: torch.Generator) -> Tensor:
    """The neutral style of the backbone's pretraining: one ink on one ground, apart from each other."""
    n, rand = len(labels), partial(torch.rand, generator=generator)
    distance = signed_distance(labels, classes, size, generator, scale=(0.45, 0.75))
    inside = _fill(distance)
    ink, ground = rand(n, 1, 1, 1), rand(n, 1, 1, 1)
    ground = torch.where((ink - ground).abs() < 0.3, (ink + 0.5).remainder(1.0), ground)
    return (ground * (1 - inside) + ink * inside + 0.05 * (rand(n, 1, size, size) - 0.5)).expand(-1, 3, -1, -1)


_STYLES = {"photo": _photo, "sketch": _sketch, "clipart": _clipart, "painting": _painting, "quickdraw": _quickdraw,
           "infograph": _infograph, "plain": _plain}
"""A domain's style -> its drawing, each (labels, classes, size, generator) -> (N, 3, size, size), unclamped."""


def render(labels: Tensor, classes: Sequence[str], style: str, size: int, generator: torch.Generator) -> Tensor:
    """Draw one shape of classes[label] per label in a domain's style: float (N, 3, size, size) in [0, 1]."""
    if style not in _STYLES:
        raise ValueError(f"unknown shapes style {style!r}; expected one of {', '.join(DOMAINS)} or plain")
    return _STYLES[style](labels, classes, size, generator).clamp(0, 1).contiguous()


def balanced_labels(num_classes: int, per_class: int, generator: torch.Generator) -> Tensor:
    """per_class of every label below num_classes, in a random order."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[torch.randperm(len(labels), generator=generator)]


def _stream(seed: int, domain: int, split: int) -> torch.Generator:
    """The random stream of one domain's split: train and test never share one."""
    return torch.Generator().manual_seed(seed * 100_003 + domain * 10 + split)


def pretraining_batch(n: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n fresh images of PRETRAINING_CLASSES in the plain style, (N, 3, size, size) in [0, 1], and their labels."""
    labels = torch.randint(len(PRETRAINING_CLASSES), (n,), generator=generator)
    return render(labels, PRETRAINING_CLASSES, "plain", size, generator), labels


@dataclass
class ShapesDomain:
    name: str
    train: DigitsDataset
    test: DigitsDataset


def build_domains(seed: int, data_config: dict, domains: Sequence[str] | None = None, num_classes: int | None = None,
                  augment: bool = False, train_per_class: int | None = None, test_per_class: int | None = None
                  ) -> list[ShapesDomain]:
    """Generate every domain's training and test images from `seed` at the data config's input size (square).
    `domains` picks and orders a subset by name; `num_classes` keeps the first classes."""
    size = int(data_config["input_size"][-1])
    if int(data_config["input_size"][-2]) != size:
        raise UserError(f"data.name shapes draws square images; the input size is {data_config['input_size']}")
    num_classes = len(CLASSES) if num_classes is None else min(num_classes, len(CLASSES))
    per_class = {0: DEFAULT_TRAIN_PER_CLASS if train_per_class is None else train_per_class,
                 1: DEFAULT_TEST_PER_CLASS if test_per_class is None else test_per_class}
    augment_transform = v2.RandomResizedCrop((size, size), scale=(0.7, 1.0), antialias=True) if augment else None
    built = []
    for name in DOMAINS if domains is None else domains:
        if name not in DOMAINS:
            raise UserError(f"data.domains: shapes has no domain {name!r}; choose from {', '.join(DOMAINS)}")
        datasets = []
        for split in (0, 1):
            generator = _stream(seed, DOMAINS.index(name), split)
            labels = balanced_labels(num_classes, per_class[split], generator)
            pixels = render(labels, CLASSES, name, size, generator)
            ids = torch.arange(len(labels)) * 2 + split  # even ids train, odd ids test
            datasets.append(DigitsDataset(pixels, labels, ids, data_config["mean"], data_config["std"],
                                          augment_transform if split == 0 else None))
        built.append(ShapesDomain(name, *datasets))
    return built


def save_preview(path: Path, seed: int = 0, image_size: int = 32, per_domain: int = 12) -> None:
    """A PNG grid with one row per domain (the first `per_domain` test images), then one of pretraining images."""
    from torchvision.utils import save_image

    data_config = {"input_size": (3, image_size, image_size), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    rows = [torch.stack([domain.test[i][0] for i in range(per_domain)])
            for domain in build_domains(seed, data_config, test_per_class=1, train_per_class=1)]
    rows.append(pretraining_batch(per_domain, image_size, torch.Generator().manual_seed(seed))[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(rows), path, nrow=per_domain, padding=2, pad_value=0.5)
