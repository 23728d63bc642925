"""Datasets read from disk: DomainNet and NICO++ (split files with labels) and plain image folders.

Building a dataset reads only the split files and directory listings and checks that every listed image exists;
images are decoded later, once into the image cache (cache.py) or with PIL at every read (data.cache off). Every
problem with the user's files is a UserError that names the path and shows the expected layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lorafair.data.cache import UNREADABLE_IMAGE, bad_image_message, rgb_image
from lorafair.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class SplitFileLayout:
    """What a dataset with split files looks like, for parsing and for error messages."""

    title: str
    domains: tuple[str, ...]
    default_num_classes: int | None
    example_lines: tuple[str, ...]

    def describe(self) -> str:
        example = " | ".join(self.example_lines)
        return (f"expected {self.title} layout: split files <root>/splits/<domain>_train.txt and _test.txt "
                f"(or <root>/<domain>_train.txt), each line '<image path relative to root> <integer label>', "
                f"e.g. the first lines of {self.domains[0]}_train.txt: {example}")


DOMAINNET = SplitFileLayout(
    title="DomainNet",
    domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
    default_num_classes=100,
    example_lines=("clipart/aircraft_carrier/clipart_001_000001.jpg 0",
                   "clipart/aircraft_carrier/clipart_001_000002.jpg 0"),
)
NICOPP = SplitFileLayout(
    title="NICO++",
    domains=("autumn", "dim", "grass", "outdoor", "rock", "water"),
    default_num_classes=None,
    example_lines=("autumn/airplane/autumn_0000001.jpg 0", "autumn/hot air balloon/autumn_0000003.jpg 27"),
)
FOLDERS_LAYOUT = ("expected image-folder layout: <root>/<domain>/<class>/<image> (e.g. <root>/sketch/cat/001.jpg), "
                  "optionally with split files <root>/<domain>_train.txt and _test.txt listing image paths relative "
                  "to root, one per line (e.g. sketch/cat/001.jpg)")


class ImageFileDataset(Dataset):
    """(path, label) samples decoded with PIL on access. With on_bad_image="skip" an unreadable image (a decompression
    bomb included) yields None, which make_loader drops and counts; with "error" it raises a UserError naming it."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, on_bad_image: str = "error") -> None:
        self.paths = [path for path, _ in samples]
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.transform = transform
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = self.transform(rgb_image(image))
        except UNREADABLE_IMAGE as err:
            if self.on_bad_image == "skip":
                return None
            raise UserError(bad_image_message(path, err)) from err
        return pixels, int(self.labels[index])


@dataclass
class DomainFiles:
    """One domain's (path, label) samples, before transforms."""

    name: str
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def _require_root(root: Path, layout: str) -> None:
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist or is not a folder; {layout}")


def _find_split_file(root: Path, domain: str, split: str) -> Path | None:
    for candidate in (root / "splits" / f"{domain}_{split}.txt", root / f"{domain}_{split}.txt"):
        if candidate.is_file():
            return candidate
    return None


def _read_lines(split_file: Path) -> list[tuple[int, str]]:
    """Non-empty lines with their 1-based line numbers."""
    text = split_file.read_text(encoding="utf-8")
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _resolve(root: Path, listed: str) -> str:
    return listed if os.path.isabs(listed) else str(root / listed)


def _check_images_exist(located: Sequence[tuple[str, str]], layout: str) -> None:
    """Raise naming the first listed image that is missing. `located` holds (image path, 'file:line') pairs.

    Each folder is listed once instead of stat-ing every file, which matters on network file systems; names not
    found in a listing are checked with a stat in case the file system ignores case."""
    listings: dict[str, set[str]] = {}
    missing = []
    for path, where in located:
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if name not in listings[folder] and not os.path.isfile(path):
            missing.append((path, where))
    if missing:
        path, where = missing[0]
        more = f" ({len(missing) - 1} more listed images are missing)" if len(missing) > 1 else ""
        raise UserError(f"{where} lists image {path}, which does not exist{more}; {layout}")


def _parse_labelled_split(split_file: Path, root: Path, layout: SplitFileLayout) -> list[tuple[str, int, int]]:
    """(path, label, line number) per line. The label is split off the right, so paths may contain spaces."""
    parsed = []
    for number, line in _read_lines(split_file):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            raise UserError(f"{split_file}:{number}: cannot read {line!r} as '<path> <label>'; {layout.describe()}")
        parsed.append((_resolve(root, parts[0]), int(parts[1]), number))
    return parsed


def read_split_file_dataset(root: Path, layout: SplitFileLayout, domains: Sequence[str] | None,
                            num_classes: int | None) -> tuple[list[DomainFiles], list[str]]:
    """Domains and class names of a dataset with labelled split files (DomainNet, NICO++).

    Labels are the split files' own; lines whose label is not below num_classes (default: the dataset's) are
    dropped. Class names are the folder names the images sit in; a label no kept line uses is named class_<label>.
    """
    _require_root(root, layout.describe())
    limit = num_classes if num_classes is not None else layout.default_num_classes
    domain_files, class_names = [], {}
    for domain in domains if domains is not None else layout.domains:
        splits = {}
        for split in ("train", "test"):
            split_file = _find_split_file(root, domain, split)
            if split_file is None:
                raise UserError(f"split file {root / 'splits' / f'{domain}_{split}.txt'} not found (nor "
                                f"{root / f'{domain}_{split}.txt'}) for domain {domain!r}; {layout.describe()}")
            kept = [(path, label, number) for path, label, number in _parse_labelled_split(split_file, root, layout)
                    if limit is None or label < limit]
            _check_images_exist([(path, f"{split_file}:{number}") for path, _, number in kept], layout.describe())
            for path, label, _ in kept:
                class_names.setdefault(label, Path(path).parent.name)
            splits[split] = [(path, label) for path, label, _ in kept]
        domain_files.append(DomainFiles(domain, splits["train"], splits["test"]))
    if not class_names:
        raise UserError(f"no split file line under {root} has a label below data.num_classes={limit}; "
                        f"{layout.describe()}")
    classes = [class_names.get(label, f"class_{label}") for label in range(max(class_names) + 1)]
    return domain_files, classes


def _class_folders(domain_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(domain_dir) if entry.is_dir() and not entry.name.startswith("."))


def _images_under(folder: Path, on_bad_image: str = "error", unreadable: list[str] | None = None) -> list[str]:
    """The image files of a class folder. An entry that cannot even be stat-ed (a symbolic link that points to
    itself or loops, a file the user may not list) is one UserError naming it, or with on_bad_image="skip" left out
    and appended to `unreadable`."""
    images = []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        try:
            is_file = entry.is_file()
        except OSError as err:
            path = str(folder / entry.name)
            if on_bad_image != "skip":
                raise UserError(bad_image_message(path, err)) from err
            if unreadable is not None:
                unreadable.append(path)
            continue
        if is_file:
            images.append(str(folder / entry.name))
    return sorted(images)


def _folder_classes(root: Path, domains: Sequence[str]) -> list[str]:
    """Sorted union of the class folders of all domains; classes differing only by case are an error because they
    would silently become two labels."""
    classes = sorted({name for domain in domains for name in _class_folders(root / domain)})
    by_case = {}
    for name in classes:
        if name.lower() in by_case:
            raise UserError(f"class folders {by_case[name.lower()]!r} and {name!r} under {root} differ only in case; "
                            f"rename one so each class has one folder name")
        by_case[name.lower()] = name
    if not classes:
        raise UserError(f"no class folders under the domains of {root}; {FOLDERS_LAYOUT}")
    return classes


def _listed_images(split_file: Path, root: Path, all_classes: Sequence[str], class_index: dict[str, int]
                   ) -> list[tuple[str, int]]:
    """Images a folders split file lists, labelled by their class folder; classes cut by num_classes are dropped."""
    located = [(_resolve(root, line), f"{split_file}:{number}") for number, line in _read_lines(split_file)]
    _check_images_exist(located, FOLDERS_LAYOUT)
    known = set(all_classes)
    for path, where in located:
        if Path(path).parent.name not in known:
            raise UserError(f"{where} lists {path}, which is not in a class folder of any domain; {FOLDERS_LAYOUT}")
    return [(path, class_index[Path(path).parent.name]) for path, _ in located if Path(path).parent.name in class_index]


def _seeded_split(samples: list[tuple[str, int]], test_fraction: float, seed: int, domain_position: int
                  ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Per class, a seeded test_fraction of the images goes to test, so every class is represented in both."""
    rng = np.random.default_rng([seed, domain_position])
    train, test = [], []
    labels = np.array([label for _, label in samples], dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        num_test = round(test_fraction * len(members))
        test += [samples[i] for i in sorted(members[:num_test])]
        train += [samples[i] for i in sorted(members[num_test:])]
    return sorted(train), sorted(test)


def read_image_folders(root: Path, domains: Sequence[str] | None, num_classes: int | None, test_fraction: float,
                       seed: int, on_bad_image: str = "error", say: Callable[[str], None] = print
                       ) -> tuple[list[DomainFiles], list[str]]:
    """Domains and class names of `<root>/<domain>/<class>/<image>`. Classes are the sorted union over domains, and
    each must hold an image in some domain; a domain without split files is split per class by test_fraction,
    seeded. A file that cannot be stat-ed (a looping symbolic link) is a UserError, or with on_bad_image="skip" left
    out and counted in one warning line."""
    _require_root(root, FOLDERS_LAYOUT)
    if domains is None:
        domains = _class_folders(root)
        if not domains:
            raise UserError(f"no domain folders under {root}; {FOLDERS_LAYOUT}")
    for domain in domains:
        if not (root / domain).is_dir():
            raise UserError(f"domain folder {root / domain} does not exist; {FOLDERS_LAYOUT}")
    all_classes = _folder_classes(root, domains)
    classes = all_classes[:num_classes] if num_classes is not None else all_classes
    class_index = {name: label for label, name in enumerate(classes)}
    domain_files, unreadable = [], []
    for position, domain in enumerate(domains):
        split_files = [_find_split_file(root, domain, split) for split in ("train", "test")]
        if all(split_files):
            train, test = (_listed_images(split_file, root, all_classes, class_index) for split_file in split_files)
        else:
            samples = [(path, class_index[name]) for name in _class_folders(root / domain) if name in class_index
                       for path in _images_under(root / domain / name, on_bad_image, unreadable)]
            train, test = _seeded_split(samples, test_fraction, seed, position)
        if not train:
            raise UserError(f"domain folder {root / domain} has no training images; {FOLDERS_LAYOUT}")
        domain_files.append(DomainFiles(domain, train, test))
    if unreadable:
        say(f"warning: data.on_bad_image=skip: left out {len(unreadable)} file(s) under {root} that cannot be read "
            f"(e.g. a symbolic link that loops), first {unreadable[0]}")
    used = {label for files in domain_files for _, label in files.train + files.test}
    empty = [name for label, name in enumerate(classes) if label not in used]
    if empty:
        raise UserError(f"class folder(s) {', '.join(map(repr, empty))} under {root} hold no images in any domain "
                        f"({', '.join(domains)}), so the model would get an output class it never sees; add images "
                        f"or remove the folder(s); {FOLDERS_LAYOUT}")
    return domain_files, classes
