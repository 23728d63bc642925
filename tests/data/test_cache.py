"""The decode-once image cache: bit-exact with the PIL path, never trusting a broken file, one builder at a time."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorafair.cli import main
from lorafair.config import DataConfig, FederationConfig
from lorafair.data import build_federated_data, evaluation_loaders, make_loader
from lorafair.data import cache as cache_module
from lorafair.data.cache import CachedImageDataset, cache_dir, normalize
from lorafair.data.loader import CachedLoader
from lorafair.errors import UserError
from tests.helpers import tiny_args

DATA_CONFIG = {"input_size": (3, 16, 16), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
               "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
CLASSES = ("ant", "bee", "cat")


def make_noisy_domainnet(root: Path, domains=("clipart", "sketch"), per_class=(4, 2)) -> None:
    """DomainNet split-file layout with noise JPEGs of varied sizes and aspect ratios, so resizing matters."""
    rng = np.random.default_rng(0)
    (root / "splits").mkdir(parents=True)
    for domain in domains:
        for split, count in zip(("train", "test"), per_class, strict=True):
            lines = []
            for label, name in enumerate(CLASSES):
                for i in range(count):
                    relative = f"{domain}/{name}/{domain}_{label}_{split}{i}.jpg"
                    width, height = rng.integers(18, 48, size=2)
                    (root / relative).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / relative)
                    lines.append(f"{relative} {label}")
            (root / "splits" / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def noisy_root(tmp_path: Path) -> Path:
    make_noisy_domainnet(tmp_path / "dn")
    return tmp_path / "dn"


def federated(root: Path, cache: str, partition: str = "iid", augment: bool = False):
    data = DataConfig(name="domainnet", root=root, domains=["clipart", "sketch"], cache=cache, num_workers=0,
                      augment=augment)
    return build_federated_data(data, FederationConfig(partition=partition, num_clients=2), 0, DATA_CONFIG)


def test_cached_batches_equal_the_pil_path_bit_for_bit(noisy_root, image_cache_dir):
    pil, cached = federated(noisy_root, "off"), federated(noisy_root, "auto")
    for shuffle in (True, False):  # iid clients mix both domains: batches gather from two cache files
        for client_pil, client_cached in zip(pil.clients, cached.clients, strict=True):
            want_loader = make_loader(client_pil.dataset, 5, shuffle=shuffle, seed=7, num_workers=0)
            loader = make_loader(client_cached.dataset, 5, shuffle=shuffle, seed=7, num_workers=0)
            assert isinstance(loader, CachedLoader)
            for _ in range(2):  # the second epoch draws the next order in both
                got, expected = list(loader), list(want_loader)
                assert len(got) == len(expected) == 3
                for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
                    assert images.dtype == torch.float32 and torch.equal(labels, want_labels)
                    assert torch.equal(images, want_images)  # bit for bit, not allclose
    for want, got in zip(evaluation_loaders(list(pil.test.values()), 1, 2, 4, 0),
                         evaluation_loaders(list(cached.test.values()), 1, 2, 4, 0), strict=True):
        pairs = list(zip(want, got, strict=True))
        assert pairs and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
    assert torch.equal(pil.test["sketch"][2][0], cached.test["sketch"][2][0])  # single items too
    assert not any(Path(noisy_root).rglob("*.pixels"))  # nothing written into the dataset root
    assert len(list(image_cache_dir.glob("*.pixels"))) == 4  # train and test of two domains


def test_fit_gives_identical_results_with_the_cache_on_and_off(tmp_path, noisy_root):
    results = []
    for cache in ("off", str(tmp_path / "cache")):
        out_dir = tmp_path / f"run_{len(results)}"
        args = tiny_args(out_dir, "--data.name", "domainnet", "--data.root", str(noisy_root), "--data.domains",
                         "[clipart, sketch]", "--data.cache", cache, "--federation.rounds", "1",
                         "--federation.clients_per_round", "2", "--data.batch_size", "4")
        assert main(["fit", *args]) == 0
        results.append(json.loads((out_dir / "results.json").read_text()))
    off, on = results
    assert list((tmp_path / "cache").glob("*.pixels"))  # the second run did read from a cache
    assert on["final"]["accuracy"] == off["final"]["accuracy"]
    assert on["rounds"][0]["train_loss"] == off["rounds"][0]["train_loss"]


def test_cache_location_follows_the_setting_and_the_environment(monkeypatch, tmp_path):
    assert cache_dir("off") is None
    assert cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.setenv("LORAFAIR_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("auto") == tmp_path / "env"
    monkeypatch.delenv("LORAFAIR_CACHE_DIR")
    assert cache_dir("auto") == tmp_path / "xdg" / "lorafair"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("auto") == tmp_path / "home" / ".cache" / "lorafair"


def first_domain(root: Path, cache: str, on_bad_image: str = "error") -> CachedImageDataset:
    data = DataConfig(name="domainnet", root=root, domains=["clipart"], cache=cache, num_workers=0,
                      on_bad_image=on_bad_image)
    return build_federated_data(data, FederationConfig(), 0, DATA_CONFIG).train["clipart"]


def pil_reference(root: Path) -> torch.Tensor:
    return torch.stack([image for image, _ in first_domain(root, "off")])


def cached_images(dataset: CachedImageDataset) -> torch.Tensor:
    return torch.cat([images for images, _ in make_loader(dataset, 5, shuffle=False, seed=0, num_workers=0)])


@pytest.fixture
def count_builds(monkeypatch) -> list[str]:
    builds = []
    build = cache_module._build

    def counting(*args, **kwargs):
        builds.append(args[3])
        return build(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_build", counting)
    return builds


def test_an_interrupted_build_leaves_nothing_a_later_run_trusts(noisy_root, tmp_path, monkeypatch, count_builds):
    decode = cache_module._decode
    decoded = []

    def interrupted(path):
        decoded.append(path)
        if len(decoded) == 5:
            raise KeyboardInterrupt
        return decode(path)

    monkeypatch.setattr(cache_module, "_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        first_domain(noisy_root, str(tmp_path / "cache")).store()
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".lock"]  # no pixels, no index, no partial file
    monkeypatch.setattr(cache_module, "_decode", decode)
    assert torch.equal(cached_images(first_domain(noisy_root, str(tmp_path / "cache"))), pil_reference(noisy_root))
    assert len(count_builds) == 2


@pytest.mark.parametrize("damage", ["truncated pixels", "pixels without index", "garbage index", "killed build"])
def test_damaged_cache_files_are_rebuilt_not_used(noisy_root, tmp_path, count_builds, damage):
    first_domain(noisy_root, str(tmp_path / "cache")).store()
    pixels = next((tmp_path / "cache").glob("*.pixels"))
    index = pixels.with_name(pixels.name.replace(".pixels", ".index.npz"))
    if damage == "truncated pixels":
        pixels.write_bytes(pixels.read_bytes()[:-100])
    elif damage == "pixels without index":
        index.unlink()
    elif damage == "garbage index":
        index.write_bytes(b"PK\x03\x04 not a zip")
    else:  # a build killed before its renames: a partial file beside last run's files, which are gone
        pixels.rename(pixels.with_name(pixels.name + ".partial"))
        index.unlink()
    assert torch.equal(cached_images(first_domain(noisy_root, str(tmp_path / "cache"))), pil_reference(noisy_root))
    assert len(count_builds) == 2
    first_domain(noisy_root, str(tmp_path / "cache")).store()
    assert len(count_builds) == 2  # the rebuilt cache is used from then on


def test_a_changed_image_or_flipped_byte_gets_a_fresh_cache(noisy_root, tmp_path, count_builds):
    first_domain(noisy_root, str(tmp_path / "cache")).store()
    pixels = next((tmp_path / "cache").glob("*.pixels"))
    raw = bytearray(pixels.read_bytes())
    raw[10] ^= 0xFF
    pixels.write_bytes(raw)  # same size: only the checksum sees it
    first_domain(noisy_root, str(tmp_path / "cache")).store(verify=True)
    assert len(count_builds) == 2
    assert torch.equal(cached_images(first_domain(noisy_root, str(tmp_path / "cache"))), pil_reference(noisy_root))
    image = noisy_root / "clipart" / "bee" / "clipart_1_train0.jpg"
    Image.new("RGB", (30, 20), (9, 9, 9)).save(image)  # new size and mtime: a new fingerprint
    assert torch.equal(cached_images(first_domain(noisy_root, str(tmp_path / "cache"))), pil_reference(noisy_root))
    assert len(count_builds) == 3


def test_not_enough_disk_space_is_one_line_naming_the_folder_the_size_and_the_setting(noisy_root, tmp_path,
                                                                                      monkeypatch, capsys):
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(UserError) as err:
        first_domain(noisy_root, str(tmp_path / "small")).store()
    needed = 12 * 3 * 16 * 16
    assert str(err.value) == (f"data.cache: {tmp_path / 'small'} has not enough free disk space for the image cache "
                              f"({needed / 1e3:.1f} kB needed); free space there, point data.cache (or "
                              f"$LORAFAIR_CACHE_DIR) to a bigger disk, or set data.cache off")
    assert not list((tmp_path / "small").glob("*.pixels*"))
    code = main(["data", "--data.name", "domainnet", "--data.root", str(noisy_root), "--data.domains", "[clipart]",
                 "--model.name", "vit_base_patch16_224", "--model.kwargs", "{img_size: 16, patch_size: 4}",
                 "--data.cache", str(tmp_path / "small"), "--build_cache", "true"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("lorafair: error: data.cache:") and "Traceback" not in lines[-1]


def _build_in_another_process(root: Path, directory: str, barrier, results) -> None:
    dataset = first_domain(root, directory)
    barrier.wait()
    store = dataset.store()
    results.put((os.getpid(), bytes(np.asarray(store.pixels))))


def test_two_processes_building_one_cache_build_it_once_and_read_the_same(noisy_root, tmp_path, monkeypatch):
    decode = cache_module._decode
    def slow_decode(path):  # long enough for the second process to arrive while the first builds
        time.sleep(0.05)
        return decode(path)

    monkeypatch.setattr(cache_module, "_decode", slow_decode)
    build = cache_module._build
    marks = tmp_path / "builds"
    marks.mkdir()

    def marking(*args, **kwargs):
        (marks / str(os.getpid())).touch()
        return build(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_build", marking)
    context = multiprocessing.get_context("fork")  # the children inherit the patched functions
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_build_in_another_process,
                                 args=(noisy_root, str(tmp_path / "cache"), barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    pixels = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert len(list(marks.iterdir())) == 1  # one builder; the other waited on the lock and read its file
    assert pixels[0][1] == pixels[1][1]
    read = torch.frombuffer(bytearray(pixels[0][1]), dtype=torch.uint8).view(-1, 3, 16, 16)
    mean, std = torch.tensor(DATA_CONFIG["mean"]), torch.tensor(DATA_CONFIG["std"])
    assert torch.equal(normalize(read, mean, std), pil_reference(noisy_root))


def test_bad_images_while_building(noisy_root, tmp_path, capsys):
    broken = noisy_root / "clipart" / "cat" / "clipart_2_train1.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(UserError, match=f"cannot read image {broken}: .*data.on_bad_image=skip"):
        first_domain(noisy_root, str(tmp_path / "cache")).store()
    assert not list((tmp_path / "cache").glob("*.pixels*"))
    dataset = first_domain(noisy_root, str(tmp_path / "cache"), on_bad_image="skip")
    loader = make_loader(dataset, 4, shuffle=False, seed=0, num_workers=0)
    labels = torch.cat([labels for _, labels in loader]).tolist()
    assert loader.skipped == 1 and labels == [0] * 4 + [1] * 4 + [2] * 3
    assert dataset[9] is None and dataset[10] is not None
    assert "1 unreadable image(s) skipped" in capsys.readouterr().err


def test_augment_caches_the_shorter_side_and_crops_at_load_time(noisy_root, tmp_path):
    fd = federated(noisy_root, str(tmp_path), partition="feature", augment=True)
    store = fd.train["clipart"].store()
    scale_size = 18  # floor(16 / 0.875)
    sides = np.minimum(store.heights, store.widths)
    assert (sides == scale_size).all() and (np.maximum(store.heights, store.widths) > scale_size).any()
    loader = make_loader(fd.clients[0].dataset, 12, shuffle=False, seed=0, num_workers=0)
    torch.manual_seed(0)
    first, second = (next(iter(loader))[0] for _ in range(2))
    assert first.shape == (12, 3, 16, 16) and not torch.equal(first, second)  # a new random crop every pass
    pil = federated(noisy_root, "off", partition="feature", augment=True)
    for want, got in zip(evaluation_loaders(list(pil.test.values()), 0, 1, 4, 0),
                         evaluation_loaders(list(fd.test.values()), 0, 1, 4, 0), strict=True):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(want, got, strict=True))  # test sets are never augmented


def test_cli_data_build_cache_builds_then_verifies(noisy_root, tmp_path, capsys):
    args = ["data", "--data.name", "domainnet", "--data.root", str(noisy_root), "--data.domains", "[clipart, sketch]",
            "--model.name", "vit_base_patch16_224", "--model.kwargs", "{img_size: 16, patch_size: 4}",
            "--data.cache", str(tmp_path / "c"), "--build_cache", "true"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "image cache ready: 4 splits, " in captured.out and captured.err.count("building the image cache") == 4
    assert main(args) == 0
    assert "building" not in capsys.readouterr().err
    assert main([*args[:-4], "--data.cache", "off", "--build_cache", "true"]) == 2


def test_pixels_overwritten_with_same_size_bytes_are_caught_on_first_use_in_a_process(noisy_root, tmp_path,
                                                                                     count_builds, monkeypatch,
                                                                                     capsys):
    checksum, checked = cache_module._file_checksum, []
    monkeypatch.setattr(cache_module, "_file_checksum", lambda path: checked.append(path) or checksum(path))
    cache = str(tmp_path / "cache")
    first_domain(noisy_root, cache).store()
    pixels = next((tmp_path / "cache").glob("*.pixels"))
    before = pixels.stat()
    raw = bytearray(pixels.read_bytes())
    raw[10:20] = bytes(255 - b for b in raw[10:20])
    pixels.write_bytes(raw)  # same size, same file, and even its old mtime back
    os.utime(pixels, ns=(before.st_atime_ns, before.st_mtime_ns))
    monkeypatch.setattr(cache_module, "_VERIFIED", set())  # what a new process (`lorafair evaluate`, say) knows
    assert torch.equal(cached_images(first_domain(noisy_root, cache)), pil_reference(noisy_root))
    assert len(count_builds) == 2 and "does not match its checksum (changed since it was built); rebuilding it" in (
        capsys.readouterr().err)
    pixels.write_bytes(bytes(len(raw)))  # within one process: a file changed since its check is checked again
    assert torch.equal(cached_images(first_domain(noisy_root, cache)), pil_reference(noisy_root))
    assert len(count_builds) == 3
    checked.clear()
    for _ in range(3):
        first_domain(noisy_root, cache).store()
    assert checked == []  # an unchanged cache is read in full once per process, not at every use


@pytest.mark.parametrize("change", [{"image_size": 24}, {"input_size": (3, 24, 24)}, {"interpolation": "bilinear"},
                                    {"crop_pct": 1.0}, {"mean": (0.5, 0.5, 0.5)}],
                         ids=["data.image_size", "model input size", "interpolation", "crop_pct", "mean"])
def test_a_cache_built_for_one_input_size_or_transform_is_not_served_for_another(noisy_root, tmp_path, change):
    cache = str(tmp_path / "cache")
    built = first_domain(noisy_root, cache)  # 16 px, bicubic, crop_pct 0.875
    assert cached_images(built).shape[-1] == 16
    data = DataConfig(name="domainnet", root=noisy_root, domains=["clipart"], cache=cache, num_workers=0,
                      image_size=change.get("image_size"))
    data_config = {**DATA_CONFIG, **{k: v for k, v in change.items() if k != "image_size"}}
    asked = build_federated_data(data, FederationConfig(), 0, data_config).train["clipart"]
    uncached = build_federated_data(DataConfig(**{**data.__dict__, "cache": "off"}), FederationConfig(), 0,
                                    data_config).train["clipart"]
    want = torch.stack([image for image, _ in uncached])
    assert not torch.equal(want[..., :16, :16], cached_images(built)[..., :want.shape[-2], :want.shape[-1]])
    assert torch.equal(cached_images(asked), want)  # the new size or transform, bit for bit
    assert len(list((tmp_path / "cache").glob("*.pixels"))) == 2
