"""Decode-once image cache: every image of a split decoded, resized and cropped once, kept as uint8 in a
memory-mapped file, then read in whole batches at memory speed.

A split's cache is two files in the cache directory, `<key>.pixels` (raw uint8, C x H x W per image, one after
another) and `<key>.index.npz` (offsets, shapes, which images were readable, a checksum). The key holds a
fingerprint of the image list, every image's size and mtime, the transform settings and the PIL version, so a
changed dataset or transform gets a new cache instead of a stale one. A build writes both files under temporary
names, re-reads and checks them, and renames the pixels first and the index last: a file without its index, or an
index whose sizes do not match, is never used. The first use of a cache in a process checks the pixels' checksum:
a file changed since it was built is rebuilt. Builders of one key take a file lock, so the ranks of a node never
build the same cache at the same time.

The cached pixels are exactly what the PIL path hands to ToTensor; `normalize` applies ToTensor's and Normalize's
float operations in the same order (x / 255, then (x - mean) / std), so cached and uncached batches are equal bit
for bit. With data.augment the cache holds the shorter-side resize and the random crop and flip run on uint8
tensors at load time (see docs/data.md).
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from filelock import FileLock, Timeout
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import v2
from tqdm import tqdm

from lorafair.errors import UserError
from lorafair.processes import die_with_parent

CACHE_FORMAT = 2
"""2: pixels come from `rgb_image` (EXIF orientation applied, 16-bit and float images scaled)."""
CACHE_DIR_ENV = "LORAFAIR_CACHE_DIR"
UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises for missing, truncated and corrupt files, and for a header declaring billions of pixels."""


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL's 16-bit greyscale modes. "I" (32-bit integer, how older PIL opens 16-bit PNGs) is read on the same 0..65535
scale; values outside it are refused."""


def rgb_image(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image the transforms take, upright: EXIF orientation applied (as ImageOps.exif_transpose does),
    16-bit greyscale scaled from 0..65535 and float greyscale from [0, 1] (or [0, 255] when its values exceed 1) to
    0..255. PIL's own convert("RGB") clips these, so a 61%-grey 16-bit PNG would read as white and a float one as
    black. Raises ValueError (an unreadable image) for pixel values outside those ranges."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "F":
            scale = 1.0 if high <= 1.0 else 255.0
            if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 255):
                raise ValueError(f"float pixels range from {low:g} to {high:g}, outside [0, 1] and [0, 255]; save "
                                 f"the image with 8-bit or 16-bit pixels")
        else:
            scale = 65535.0
            if low < 0 or high > scale:
                raise ValueError(f"{image.mode} pixels range from {low:g} to {high:g}, outside the 16-bit range "
                                 f"0..65535; save the image with 8-bit or 16-bit pixels")
        eight_bit = np.rint(values * (255.0 / scale)).astype(np.uint8)
        image = Image.fromarray(eight_bit)
    return image.convert("RGB")


def human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size / 1e3:.1f} kB"


def bad_image_message(path: str, err: Exception) -> str:
    return (f"cannot read image {path}: {err}. Replace or delete the file, or set data.on_bad_image=skip to skip "
            f"unreadable images")


def cache_dir(setting: str) -> Path | None:
    """Where data.cache puts its files: None for off; `auto` is $LORAFAIR_CACHE_DIR, else $XDG_CACHE_HOME/lorafair,
    else ~/.cache/lorafair (never the dataset root, which is often read-only)."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorafair"


# ---- what is cached and how it becomes the model's input ------------------------------------------------------

@dataclass(frozen=True)
class PixelRecipe:
    """`prepare` turns a PIL image into the cached pixels; `augment` (random, on a uint8 tensor) runs at load time;
    mean and std are Normalize's. `shape` is (C, H, W) when every cached image has it."""

    prepare: Callable
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shape: tuple[int, int, int] | None
    augment: Callable | None = None

    def describe(self) -> str:
        return f"{self.prepare!r} | {self.augment!r} | mean {self.mean} std {self.std} | PIL {PIL.__version__}"


def _split_at_to_tensor(transform: T.Compose) -> tuple[list, T.Normalize]:
    """(the PIL operations before ToTensor, the Normalize after it) of a timm transform."""
    ops = list(transform.transforms)
    at = next((i for i, op in enumerate(ops) if isinstance(op, T.ToTensor)), None)
    if at is None or len(ops) != at + 2 or not isinstance(ops[at + 1], T.Normalize):
        raise ValueError(f"expected PIL operations, then ToTensor and Normalize; got {transform}")
    return ops[:at], ops[at + 1]


def pixel_recipes(train_transform: T.Compose, eval_transform: T.Compose, augment: bool,
                  input_size: Sequence[int]) -> tuple[PixelRecipe, PixelRecipe]:
    """(train, eval) recipes equivalent to timm's transforms. Without augment both cache the resized, centre-
    cropped image. With augment, train caches the shorter-side resize of the eval transform and applies timm's
    random-resized-crop and flip settings to the uint8 tensor."""
    eval_ops, normalize = _split_at_to_tensor(eval_transform)
    mean, std = tuple(float(m) for m in normalize.mean), tuple(float(s) for s in normalize.std)
    eval_recipe = PixelRecipe(T.Compose(eval_ops), mean, std, tuple(int(s) for s in input_size))
    if not augment:
        return eval_recipe, eval_recipe
    train_ops, _ = _split_at_to_tensor(train_transform)
    crop, flip = train_ops
    if not isinstance(eval_ops[0], T.Resize) or not isinstance(crop.interpolation, T.InterpolationMode):
        raise UserError(f"data.cache with data.augment needs timm's centre-crop eval transform and one "
                        f"interpolation, got {eval_transform}; set data.cache off")
    random_ops = v2.Compose([v2.RandomResizedCrop(crop.size, scale=crop.scale, ratio=crop.ratio,
                                                  interpolation=crop.interpolation, antialias=True),
                             v2.RandomHorizontalFlip(p=flip.p)])
    return PixelRecipe(eval_ops[0], mean, std, None, random_ops), eval_recipe


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 exactly as ToTensor then Normalize compute it. 255 is a tensor on the pixels'
    device: CUDA divides by a CPU scalar as a multiplication by its reciprocal, which differs in the last bit."""
    scale = torch.tensor(255.0, device=pixels.device)
    return pixels.to(torch.float32).div_(scale).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


# ---- one split's cache on disk --------------------------------------------------------------------------------

@dataclass
class CacheStore:
    """An opened cache: the memory-mapped pixels and where each image lies in them."""

    pixels: np.ndarray
    offsets: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    readable: np.ndarray
    shape: tuple[int, int, int] | None

    def batch_view(self) -> np.ndarray:
        """The pixels as (N, C, H, W); only for caches whose images all have one shape."""
        return self.pixels.reshape(len(self.offsets) - 1, *self.shape)

    def image(self, index: int) -> torch.Tensor:
        start, end = self.offsets[index], self.offsets[index + 1]
        return torch.from_numpy(self.pixels[start:end].reshape(3, self.heights[index], self.widths[index]).copy())


def fingerprint(paths: Sequence[str], recipe: PixelRecipe) -> str:
    """Changes when the image list, any image's size or mtime, the transforms or the PIL version change."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, recipe.describe()]).encode())
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as err:
            raise UserError(f"cannot read image {path}: {err}; restore the file or remove it from the split") from err
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _file_checksum(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


_VERIFIED: set[tuple[str, int, int, int]] = set()
"""(pixel file, inode, size, mtime) of every cache whose checksum this process has checked: each cache is read in
full once per process (and again if the file changes), so pixels overwritten with same-size bytes are never served."""


def _verified_before(pixel_path: Path) -> tuple[bool, tuple[str, int, int, int]]:
    stat = pixel_path.stat()
    identity = (str(pixel_path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return identity in _VERIFIED, identity


def _open_valid(directory: Path, key: str, expected_fingerprint: str, count: int, verify: bool) -> CacheStore | None:
    """The cache of `key` if its index is complete and matches the pixel file and its checksum. The checksum is
    checked on the first use in this process of each pixel file, and always with verify."""
    index_path, pixel_path = directory / f"{key}.index.npz", directory / f"{key}.pixels"
    if not index_path.is_file() or not pixel_path.is_file():
        return None
    try:
        with np.load(index_path, allow_pickle=False) as index:
            meta = json.loads(str(index["meta"]))
            offsets, heights, widths, readable = (index[name] for name in ("offsets", "heights", "widths", "readable"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    total = int(offsets[-1]) if len(offsets) == count + 1 else -1
    if (meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != expected_fingerprint
            or len(readable) != count or pixel_path.stat().st_size != total):
        return None
    checked, identity = _verified_before(pixel_path)
    if verify or not checked:
        if _file_checksum(pixel_path) != meta.get("checksum"):
            print(f"the image cache {pixel_path} does not match its checksum (changed since it was built); "
                  f"rebuilding it", file=sys.stderr)
            return None
        _VERIFIED.add(identity)
    pixels = np.memmap(pixel_path, dtype=np.uint8, mode="r", shape=(total,)) if total else np.zeros(0, np.uint8)
    shape = tuple(meta["shape"]) if meta["shape"] else None
    return CacheStore(pixels, offsets, heights, widths, readable, shape)


@contextmanager
def _exclusive(lock_path: Path, description: str) -> Iterator[None]:
    """Hold an exclusive lock on lock_path (filelock); says so when it has to wait for another process."""
    lock = FileLock(lock_path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process to finish the image cache of {description}", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def open_or_build(paths: Sequence[str], recipe: PixelRecipe, directory: Path, name: str, on_bad_image: str,
                  workers: int, verify: bool = False) -> CacheStore:
    """The valid cache of these images, built first (under a lock shared with other processes) if there is none."""
    key_fingerprint = fingerprint(paths, recipe)
    key = f"{name}-{key_fingerprint[:24]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock_path = directory / f"{key}.lock"
        lock_path.touch()
    except OSError as err:
        raise UserError(f"data.cache: cannot write the image cache in {directory} ({err.strerror}); point "
                        f"data.cache (or ${CACHE_DIR_ENV}) to a writable folder, or set data.cache off") from err
    with _exclusive(lock_path, name):
        store = _open_valid(directory, key, key_fingerprint, len(paths), verify)
        if store is None:
            _build(paths, recipe, directory, key, key_fingerprint, name, on_bad_image, workers)
            store = _open_valid(directory, key, key_fingerprint, len(paths), verify=False)
        if store is None:
            raise RuntimeError(f"the image cache {directory / key} did not validate right after it was built")
    return store


# ---- building ------------------------------------------------------------------------------------------------

_PREPARE: Callable | None = None


def _set_prepare(prepare: Callable) -> None:
    global _PREPARE
    _PREPARE = prepare


def _start_worker(prepare: Callable) -> None:
    die_with_parent()
    _set_prepare(prepare)


def _decode(path: str) -> tuple[np.ndarray | None, str | None]:
    """(C x H x W uint8 pixels, None), or (None, the message) for an unreadable image."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(_PREPARE(rgb_image(image)), dtype=np.uint8)
    except UNREADABLE_IMAGE as err:
        return None, bad_image_message(path, err)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), None


def _decoded(paths: Sequence[str], prepare: Callable, workers: int) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Every image decoded, in order; by `workers` processes when workers > 0."""
    if workers == 0:
        _set_prepare(prepare)
        yield from map(_decode, paths)
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker, initargs=(prepare,)) as pool:
        yield from pool.imap(_decode, paths, chunksize=8)


def _size_needed(count: int, recipe: PixelRecipe) -> tuple[int, str]:
    """(bytes, how to say it): exact for a fixed shape; shorter-side resizes are counted at 4:3."""
    if recipe.shape is not None:
        return count * int(np.prod(recipe.shape)), ""
    side = recipe.prepare.size if isinstance(recipe.prepare.size, int) else recipe.prepare.size[0]
    return count * 3 * side * side * 4 // 3, "about "


def _space_error(directory: Path, needed: int) -> UserError:
    return UserError(f"data.cache: {directory} has not enough free disk space for the image cache "
                     f"({human_size(needed)} needed); free space there, point data.cache (or ${CACHE_DIR_ENV}) "
                     f"to a bigger disk, or set data.cache off")


def _build(paths: Sequence[str], recipe: PixelRecipe, directory: Path, key: str, key_fingerprint: str, name: str,
           on_bad_image: str, workers: int) -> None:
    """Decode every image into `<key>.pixels.partial`, check it, rename pixels then index into place."""
    needed, about = _size_needed(len(paths), recipe)
    print(f"building the image cache of {name}: {len(paths)} images, {about}{human_size(needed)} in {directory} "
          f"(data.cache)", file=sys.stderr)
    if shutil.disk_usage(directory).free < needed:
        raise _space_error(directory, needed)
    partial, index_partial = directory / f"{key}.pixels.partial", directory / f"{key}.index.partial"
    try:
        offsets, heights, widths, readable, checksum = _write_pixels(paths, recipe, partial, name, on_bad_image,
                                                                     workers)
        if partial.stat().st_size != offsets[-1] or _file_checksum(partial) != checksum:
            raise OSError(errno.EIO, f"{partial} does not read back as written")
        meta = {"format": CACHE_FORMAT, "fingerprint": key_fingerprint, "checksum": checksum,
                "shape": list(recipe.shape) if recipe.shape else None, "images": len(paths)}
        with index_partial.open("wb") as file:
            np.savez(file, meta=np.array(json.dumps(meta)), offsets=offsets, heights=heights, widths=widths,
                     readable=readable)
        os.replace(partial, directory / f"{key}.pixels")
        _VERIFIED.add(_verified_before(directory / f"{key}.pixels")[1])  # read back and checksummed just above
        os.replace(index_partial, directory / f"{key}.index.npz")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _space_error(directory, needed) from err
        raise
    finally:
        partial.unlink(missing_ok=True)
        index_partial.unlink(missing_ok=True)
    skipped = int((~readable).sum())
    if skipped:
        print(f"image cache of {name}: {skipped} unreadable image(s) skipped (data.on_bad_image=skip)",
              file=sys.stderr)


def _write_pixels(paths: Sequence[str], recipe: PixelRecipe, partial: Path, name: str, on_bad_image: str,
                  workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """Append every image's pixels to `partial`; an unreadable one stops the build or (skip) is marked. Images of a
    fixed-shape cache keep one slot each (zeros where unreadable), so the file reads as an (N, C, H, W) array."""
    count = len(paths)
    offsets = np.zeros(count + 1, dtype=np.int64)
    heights, widths = np.zeros(count, dtype=np.int32), np.zeros(count, dtype=np.int32)
    readable = np.ones(count, dtype=bool)
    digest = hashlib.blake2b(digest_size=16)
    with partial.open("wb") as file:
        decoded = _decoded(paths, recipe.prepare, workers)
        for index, (pixels, error) in enumerate(tqdm(decoded, total=count, desc=f"caching {name}", unit="img",
                                                     file=sys.stderr, dynamic_ncols=True)):
            if error is not None:
                if on_bad_image == "error":
                    raise UserError(error)
                readable[index] = False
                pixels = np.zeros(recipe.shape or (3, 0, 0), dtype=np.uint8)
            data = pixels.tobytes()
            file.write(data)
            digest.update(data)
            heights[index], widths[index] = pixels.shape[1:]
            offsets[index + 1] = offsets[index] + len(data)
        file.flush()
        os.fsync(file.fileno())
    return offsets, heights, widths, readable, digest.hexdigest()


# ---- the dataset ---------------------------------------------------------------------------------------------

class CachedImageDataset(Dataset):
    """(path, label) samples read from a decode-once cache, opened (and built if needed) on first use.

    make_loader reads it a whole batch at a time; indexing one item gives what ImageFileDataset gives (a
    normalised float tensor and the label, or None for an image skipped as unreadable)."""

    def __init__(self, samples: Sequence[tuple[str, int]], recipe: PixelRecipe, directory: Path, name: str,
                 on_bad_image: str = "error", build_workers: int = 0) -> None:
        self.paths = [path for path, _ in samples]
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.recipe, self.directory, self.name = recipe, directory, name
        self.on_bad_image, self.build_workers = on_bad_image, build_workers
        self.mean, self.std = torch.tensor(recipe.mean), torch.tensor(recipe.std)
        self._store: CacheStore | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def store(self, verify: bool = False) -> CacheStore:
        if self._store is None or verify:
            self._store = open_or_build(self.paths, self.recipe, self.directory, self.name, self.on_bad_image,
                                        self.build_workers, verify)
        return self._store

    def pixels(self, index: int) -> torch.Tensor:
        """The image as uint8 C x H x W, after the random augmentation if there is one."""
        image = self.store().image(index)
        return self.recipe.augment(image) if self.recipe.augment is not None else image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        if not self.store().readable[index]:
            return None
        return normalize(self.pixels(index)[None], self.mean, self.std)[0], int(self.labels[index])
