"""Datasets on disk: miniature DomainNet, NICO++ and image-folder trees with real JPEGs, and every bad-input message."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorafair.cli import main
from lorafair.config import DataConfig, FederationConfig
from lorafair.data import build_client_data, build_federated_data, make_loader
from lorafair.data.cache import CachedImageDataset, pixel_recipes
from lorafair.data.image_files import DOMAINNET, NICOPP, ImageFileDataset, read_image_folders, read_split_file_dataset
from lorafair.data.transforms import image_transforms
from lorafair.errors import UserError
from lorafair.inference import ImageList
from tests.helpers import DATA_CONFIG, DOMAINNET_CLASSES, ROOT, make_domainnet, png_bomb, write_jpeg


def make_nicopp(root: Path) -> None:
    """NICO++ split files at the root; class folders with spaces in their names."""
    classes = {3: "hot air balloon", 59: "Sailboat", 10: "dog"}
    for domain in ("autumn", "dim"):
        for split, count in (("train", 4), ("test", 2)):
            lines = []
            for label, name in classes.items():
                for i in range(count):
                    relative = f"{domain}/{name}/{split} image {i}.jpg"
                    write_jpeg(root / relative, label + i)
                    lines.append(f"{relative} {label}")
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def domainnet(tmp_path: Path) -> Path:
    make_domainnet(tmp_path / "domainnet")
    return tmp_path / "domainnet"


def test_domainnet_labels_come_from_split_files_and_the_class_filter_keeps_labels_below_100(domainnet):
    domains, classes = read_split_file_dataset(domainnet, DOMAINNET, ["clipart", "sketch"], None)
    assert classes == ["zebra", "Aircraft_Carrier", "bat"]
    for domain in domains:
        assert {label for _, label in domain.train} == {0, 1, 2}
        assert len(domain.train) == 3 * 6 and len(domain.test) == 3 * 2
        for path, label in domain.train + domain.test:
            assert Path(path).is_file()
            assert Path(path).parent.name == DOMAINNET_CLASSES[label]
            assert Path(path).parent.parent.name == domain.name

    _, classes = read_split_file_dataset(domainnet, DOMAINNET, ["clipart"], 2)
    assert classes == ["zebra", "Aircraft_Carrier"]
    domains, classes = read_split_file_dataset(domainnet, DOMAINNET, ["clipart"], 1000)
    assert len(classes) == 151 and classes[120] == "yoga" and classes[150] == "Apple" and classes[5] == "class_5"
    assert {label for _, label in domains[0].train} == {0, 1, 2, 120, 150}


def test_domainnet_flat_split_file_layout_reads_the_same(tmp_path, domainnet):
    make_domainnet(tmp_path / "flat", flat_layout=True)
    official, _ = read_split_file_dataset(domainnet, DOMAINNET, ["clipart", "sketch"], None)
    flat, _ = read_split_file_dataset(tmp_path / "flat", DOMAINNET, ["clipart", "sketch"], None)
    relative = [[Path(p).relative_to(root) for p, _ in d.train] for d, root in
                [(official[0], domainnet), (flat[0], tmp_path / "flat")]]
    assert relative[0] == relative[1]


def test_build_federated_domainnet_yields_normalised_images_at_model_size(domainnet):
    data = DataConfig(name="domainnet", root=domainnet, domains=["clipart", "sketch"], num_workers=0)
    fd = build_federated_data(data, FederationConfig(partition="feature"), 0, DATA_CONFIG)
    assert fd.domains == ["clipart", "sketch"] and fd.num_classes == 3
    assert [(c.id, c.domain, c.num_samples) for c in fd.clients] == [(0, "clipart", 18), (1, "sketch", 18)]
    assert fd.clients[0].class_counts == [6, 6, 6]
    assert list(fd.test) == ["clipart", "sketch"] and len(fd.test["sketch"]) == 6
    images, labels = next(iter(make_loader(fd.clients[1].dataset, 5, shuffle=False, seed=0, num_workers=0)))
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1 and images.min() < 0  # (x - 0.5) / 0.5

    fd = build_federated_data(DataConfig(name="domainnet", root=domainnet, domains=["clipart"], image_size=8),
                              FederationConfig(), 0, DATA_CONFIG)
    assert fd.test["clipart"][0][0].shape == (3, 8, 8)


def test_nicopp_paths_with_spaces(tmp_path):
    make_nicopp(tmp_path)
    domains, classes = read_split_file_dataset(tmp_path, NICOPP, ["autumn", "dim"], None)
    assert len(classes) == 60 and classes[3] == "hot air balloon" and classes[59] == "Sailboat"
    assert any(" " in path for path, _ in domains[0].train)
    data = DataConfig(name="nicopp", root=tmp_path, domains=["autumn", "dim"])
    fd = build_federated_data(data, FederationConfig(partition="iid", num_clients=3), 1, DATA_CONFIG)
    assert [c.domain for c in fd.clients] == ["mixed"] * 3 and sum(c.num_samples for c in fd.clients) == 24
    image, label = fd.test["dim"][0]
    assert image.shape == (3, 16, 16) and label in (3, 10, 59)


def make_folders(root: Path) -> None:
    for domain, classes in (("photo", ("cat", "dog")), ("sketch", ("dog", "emu", "Bee"))):
        for name in classes:
            for i in range(10):
                write_jpeg(root / domain / name / f"{i}.jpg", i)


def test_image_folders_classes_are_the_sorted_union_and_the_split_is_seeded(tmp_path):
    make_folders(tmp_path)
    domains, classes = read_image_folders(tmp_path, None, None, 0.3, seed=0)
    assert classes == ["Bee", "cat", "dog", "emu"]
    assert [d.name for d in domains] == ["photo", "sketch"]
    photo = domains[0]
    assert len(photo.test) == 6 and len(photo.train) == 14  # 3 of 10 per class
    assert not {p for p, _ in photo.train} & {p for p, _ in photo.test}
    assert {label for _, label in photo.train} == {1, 2}
    again, _ = read_image_folders(tmp_path, None, None, 0.3, seed=0)
    other, _ = read_image_folders(tmp_path, None, None, 0.3, seed=1)
    assert again[0].test == photo.test and other[0].test != photo.test

    _, cut = read_image_folders(tmp_path, ["sketch"], 2, 0.3, seed=0)
    assert cut == ["Bee", "dog"]  # the union over the chosen domains only


def test_image_folders_use_split_files_when_present(tmp_path):
    make_folders(tmp_path)
    (tmp_path / "photo_train.txt").write_text("photo/cat/0.jpg\nphoto/dog/1.jpg\n")
    (tmp_path / "photo_test.txt").write_text("photo/dog/2.jpg\n")
    domains, classes = read_image_folders(tmp_path, ["photo"], None, 0.3, seed=0)
    assert classes == ["cat", "dog"]
    assert domains[0].train == [(str(tmp_path / "photo/cat/0.jpg"), 0), (str(tmp_path / "photo/dog/1.jpg"), 1)]
    assert domains[0].test == [(str(tmp_path / "photo/dog/2.jpg"), 1)]

    (tmp_path / "photo_test.txt").write_text("photo/dog/2.jpg\nphoto/stray.jpg\n")
    write_jpeg(tmp_path / "photo" / "stray.jpg", 0)
    with pytest.raises(UserError, match=r"photo_test.txt:2 lists .*photo/stray.jpg, which is not in a class folder"):
        read_image_folders(tmp_path, ["photo"], None, 0.3, seed=0)


@pytest.mark.parametrize("cache", ["auto", "off"])
@pytest.mark.parametrize("augment", [False, True])
def test_augment_redraws_each_fetch_of_a_training_image_and_never_a_test_image(tmp_path, augment, cache):
    """Both ways of reading images: the decode-once cache (crop and flip on its uint8 pixels) and PIL."""
    for i in range(10):  # an asymmetric picture, so that a flip or a crop shows
        path = tmp_path / "photo" / "cat" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3) * (i + 1)).save(path)
    data = DataConfig(name="folders", root=tmp_path, augment=augment, cache=cache)
    fd = build_federated_data(data, FederationConfig(), 0, DATA_CONFIG)
    assert isinstance(fd.test["photo"], CachedImageDataset) == (cache == "auto")
    torch.manual_seed(0)
    train = fd.clients[0].dataset
    assert torch.equal(train[0][0], train[0][0]) != augment
    assert torch.equal(fd.test["photo"][0][0], fd.test["photo"][0][0])


def test_image_folders_refuse_classes_that_differ_only_in_case(tmp_path):
    make_folders(tmp_path)
    write_jpeg(tmp_path / "photo" / "Dog" / "0.jpg", 1)
    with pytest.raises(UserError, match="'Dog' and 'dog'"):
        read_image_folders(tmp_path, None, None, 0.3, seed=0)


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as err:
        build_federated_data(DataConfig(name="domainnet", root=missing), FederationConfig(), 0, DATA_CONFIG)
    message = str(err.value)
    assert str(missing) in message and "clipart/aircraft_carrier/clipart_001_000001.jpg 0" in message
    with pytest.raises(UserError, match=r"nowhere.*<root>/<domain>/<class>/<image>"):
        read_image_folders(missing, None, None, 0.2, 0)


def test_a_domain_without_test_images_is_refused(tmp_path):
    root = tmp_path / "domainnet"
    make_domainnet(root, per_class=(6, 2))
    (root / "splits" / "sketch_test.txt").write_text("")
    with pytest.raises(UserError, match=r"sketch have no test images"):
        build_federated_data(DataConfig(name="domainnet", root=root, domains=["clipart", "sketch"]),
                             FederationConfig(), 0, DATA_CONFIG)


def test_missing_split_file(domainnet):
    with pytest.raises(UserError) as err:
        read_split_file_dataset(domainnet, DOMAINNET, ["clipart", "quickdraw"], None)
    message = str(err.value)
    assert str(domainnet / "splits" / "quickdraw_train.txt") in message
    assert "clipart/aircraft_carrier/clipart_001_000001.jpg 0" in message


def test_split_line_pointing_to_a_missing_image(domainnet):
    lines = (domainnet / "splits" / "sketch_test.txt").read_text().splitlines()
    lines[2] = "sketch/zebra/not_there.jpg 0"
    (domainnet / "splits" / "sketch_test.txt").write_text("\n".join(lines))
    with pytest.raises(UserError) as err:
        read_split_file_dataset(domainnet, DOMAINNET, ["clipart", "sketch"], None)
    message = str(err.value)
    assert f"sketch_test.txt:3 lists image {domainnet / 'sketch/zebra/not_there.jpg'}" in message
    assert "clipart/aircraft_carrier/clipart_001_000001.jpg 0" in message


def test_split_line_without_a_label(tmp_path):
    make_nicopp(tmp_path)
    with (tmp_path / "dim_test.txt").open("a") as f:
        f.write("dim/dog/no label.jpg\n")
    with pytest.raises(UserError, match=r"dim_test.txt:7: cannot read 'dim/dog/no label.jpg' as '<path> <label>'"):
        read_split_file_dataset(tmp_path, NICOPP, ["autumn", "dim"], None)


def test_the_png_bomb_is_one():
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(png_bomb()))


@pytest.fixture(params=["garbage", "decompression bomb"])
def corrupt_client(domainnet, request):
    """A domainnet tree whose clipart/bat training images are all broken; returns a builder of its one client."""
    for path in (domainnet / "clipart" / "bat").glob("*train*.jpg"):
        path.write_bytes(b"not a jpeg" if request.param == "garbage" else png_bomb())

    def build(on_bad_image, cache):
        data = DataConfig(name="domainnet", root=domainnet, domains=["clipart"], on_bad_image=on_bad_image,
                          cache=cache)
        return build_federated_data(data, FederationConfig(), 0, DATA_CONFIG).clients[0].dataset

    return build


PIL_AND_CACHE = pytest.mark.parametrize("num_workers, cache", [(0, "off"), (2, "off"), (0, "auto")])


@PIL_AND_CACHE
def test_corrupt_image_error_names_the_file(corrupt_client, num_workers, cache):
    with pytest.raises(UserError) as err:  # the cache meets the image while it builds, the PIL path when it reads
        list(make_loader(corrupt_client("error", cache), 4, shuffle=False, seed=0, num_workers=num_workers))
    message = str(err.value)
    assert message.startswith("cannot read image ") and "/clipart/bat/" in message
    assert "data.on_bad_image=skip" in message and "Traceback" not in message


@PIL_AND_CACHE
def test_corrupt_images_skipped_and_counted(corrupt_client, num_workers, cache):
    loader = make_loader(corrupt_client("skip", cache), 4, shuffle=True, seed=0, num_workers=num_workers)
    labels = torch.cat([labels for _, labels in loader])
    assert loader.skipped == 6
    assert len(labels) == 12 and 2 not in labels.tolist()
    list(loader)
    assert loader.skipped == 6  # a second epoch meets the same 6 files: distinct files are counted


def test_loader_order_is_a_pure_function_of_the_seed(domainnet):
    dataset = build_federated_data(DataConfig(name="domainnet", root=domainnet, domains=["clipart"]),
                                   FederationConfig(), 0, DATA_CONFIG).clients[0].dataset

    def order(seed, num_workers=0):
        loader = make_loader(dataset, 5, shuffle=True, seed=seed, num_workers=num_workers)
        return [images[:, 0, 0, 0] for images, _ in loader]

    first = torch.cat(order(3))
    assert torch.equal(first, torch.cat(order(3, num_workers=2)))
    assert not torch.equal(first, torch.cat(order(4)))
    assert np.allclose(sorted(first.tolist()), sorted(torch.cat(order(4)).tolist()))


HETERO_RANKS = {"clipart": "16", "infograph": "4", "painting": "8", "quickdraw": "4", "real": "16", "sketch": "8"}


@pytest.mark.parametrize("name", ["vit_domainnet", "vit_domainnet_hetero"])
def test_cli_data_on_a_domainnet_tree_with_the_shipped_config(tmp_path, capsys, name):
    root = tmp_path / "domainnet"
    make_domainnet(root, domains=DOMAINNET.domains)
    config = ROOT / "configs" / f"{name}.yaml"
    assert main(["data", "--config", str(config), "--data.root", str(root), "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "domainnet: 6 domains, 3 classes, 6 clients (feature partition, seed 0), images 224x224" in out
    rows = [line.split() for line in out.splitlines()]
    ranks = HETERO_RANKS if name.endswith("hetero") else dict.fromkeys(DOMAINNET.domains, "16")
    assert [row[1:] for row in rows if row[:1] and row[0].isdigit()] == [[d, "18", "3", ranks[d]]
                                                                         for d in DOMAINNET.domains]
    assert ["total", "108", "3"] in rows and ["total", "36"] in rows and (tmp_path / "c.png").is_file()


def test_a_node_holds_only_its_own_clients_files(domainnet):
    """build_client_data (a Flower node's data) is client k of build_federated_data, item for item, as a file
    dataset of its own images only: the nodes' files are disjoint and together every training image."""
    data = DataConfig(name="domainnet", root=domainnet, domains=["clipart", "sketch"], num_workers=0, cache="off")
    federation = FederationConfig(partition="iid", num_clients=3, min_client_samples=1)
    full = build_federated_data(data, federation, 0, DATA_CONFIG)
    nodes = [build_client_data(data, federation, 0, DATA_CONFIG, k)[0] for k in range(3)]
    for node, reference in zip(nodes, full.clients, strict=True):
        assert isinstance(node.dataset, ImageFileDataset)
        assert (node.id, node.num_samples, node.class_counts) == (reference.id, reference.num_samples,
                                                                  reference.class_counts)
        for index in range(len(reference.dataset)):
            (image, label), (expected_image, expected_label) = node.dataset[index], reference.dataset[index]
            assert torch.equal(image, expected_image) and label == expected_label
    paths = [path for node in nodes for path in node.dataset.paths]
    assert len(set(paths)) == len(paths) == sum(len(d.paths) for d in full.clients[0].dataset.dataset.datasets)
    cached = DataConfig(name="domainnet", root=domainnet, domains=["clipart", "sketch"], num_workers=0, cache="auto")
    assert build_client_data(cached, federation, 0, DATA_CONFIG, 1)[0].dataset.paths == nodes[1].dataset.paths
    with pytest.raises(UserError, match="partition-id 3 is not a client of this partition"):
        build_client_data(data, federation, 0, DATA_CONFIG, 3)


GREY = 0.61


def write_grey_images(folder: Path) -> dict[str, Path]:
    """A 61%-grey square in every pixel depth PIL opens: 8-bit, 16-bit (I;16), 32-bit integer (I) and float (F)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {"8-bit": (np.full((10, 10), round(GREY * 255), np.uint8), "g8.png"),
              "16-bit": (np.full((10, 10), round(GREY * 65535), np.uint16), "g16.png"),
              "32-bit integer": (np.full((10, 10), round(GREY * 65535), np.int32), "g32.tif"),
              "float": (np.full((10, 10), GREY, np.float32), "gf.tif")}
    paths = {}
    for kind, (values, name) in images.items():
        Image.fromarray(values).save(folder / name)
        paths[kind] = folder / name
    assert [Image.open(p).mode for p in paths.values()] == ["L", "I;16", "I", "F"]
    return paths


def readers(paths: list[Path], root: Path) -> dict[str, object]:
    """Each image's model input as the PIL path, the decode-once cache and predict's reader give it."""
    data_cfg = DataConfig(name="folders", root=root)
    train_transform, eval_transform = image_transforms(DATA_CONFIG, data_cfg)
    recipe = pixel_recipes(train_transform, eval_transform, False, DATA_CONFIG["input_size"])[1]
    samples = [(str(path), 0) for path in paths]
    return {"pil": ImageFileDataset(samples, eval_transform),
            "cache": CachedImageDataset(samples, recipe, root / "cache", "grey"),
            "predict": ImageList(paths, eval_transform)}


def test_sixteen_bit_and_float_images_read_at_their_grey_level_not_white_or_black(tmp_path):
    paths = write_grey_images(tmp_path / "grey")
    expected = (round(GREY * 255) / 255 - 0.5) / 0.5  # the 8-bit grey through ToTensor and Normalize(0.5, 0.5)
    for way, dataset in readers(list(paths.values()), tmp_path).items():
        for kind, (image, _) in zip(paths, dataset, strict=True):
            assert image.shape == (3, 16, 16)
            assert torch.allclose(image, torch.full_like(image, expected), atol=1e-6), (way, kind, image.mean())


@pytest.mark.parametrize("values", [np.full((10, 10), 300.0, np.float32), np.full((10, 10), -0.2, np.float32),
                                    np.full((10, 10), np.nan, np.float32), np.full((10, 10), 70000, np.int32)],
                         ids=["float above 255", "negative float", "NaN", "integer above 16 bits"])
def test_pixels_outside_a_known_range_are_a_bad_image_named_in_one_line(tmp_path, values):
    Image.fromarray(values).save(tmp_path / "odd.tif")
    for way, dataset in readers([tmp_path / "odd.tif"], tmp_path).items():
        with pytest.raises(UserError) as err:
            dataset[0]
        message = str(err.value)
        assert "\n" not in message and "odd.tif" in message, way
        assert "save the image with 8-bit or 16-bit pixels" in message, way
    skipping = ImageFileDataset([(str(tmp_path / "odd.tif"), 0)], lambda image: image, on_bad_image="skip")
    assert skipping[0] is None


def upright_and_rotated(folder: Path) -> tuple[Path, Path]:
    """An asymmetric picture saved upright, and saved turned on its side with the EXIF tag that turns it back."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((12, 20, 3), np.uint8)
    pixels[:, :5] = 255  # a white band on the left
    pixels[:4, :, 1] = 200  # a green band along the top
    upright = Image.fromarray(pixels)
    upright.save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown after turning 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.png", exif=exif)
    assert Image.open(folder / "rotated.png").size == (12, 20)
    return folder / "upright.png", folder / "rotated.png"


def test_exif_orientation_is_applied_in_training_evaluation_the_cache_and_predict(tmp_path):
    upright, rotated = upright_and_rotated(tmp_path / "images")
    for way, dataset in readers([upright, rotated], tmp_path).items():
        assert torch.equal(dataset[0][0], dataset[1][0]), way
        assert not torch.equal(dataset[0][0], dataset[0][0].flip(-1)), way  # the picture does show a turn
    for i in range(4):  # and through a whole folders dataset, augmenting training images
        upright_and_rotated(tmp_path / "root" / "photo" / f"class{i % 2}")
    for cache in ("off", "auto"):
        fd = build_federated_data(DataConfig(name="folders", root=tmp_path / "root", cache=cache, augment=True,
                                             test_fraction=0.5), FederationConfig(), 0, DATA_CONFIG)
        test = fd.test["photo"]
        assert len(test) == 2 and torch.equal(test[0][0], readers([upright], tmp_path)["pil"][0][0])


def test_a_class_folder_without_images_in_any_domain_is_refused(tmp_path):
    make_folders(tmp_path)
    (tmp_path / "photo" / "yak").mkdir()
    (tmp_path / "sketch" / "yak").mkdir()
    (tmp_path / "sketch" / "yak" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"^class folder\(s\) 'yak' under .* hold no images in any domain "
                                        r"\(photo, sketch\).*add images or remove the folder"):
        read_image_folders(tmp_path, None, None, 0.3, seed=0)
    assert read_image_folders(tmp_path, None, 4, 0.3, seed=0)[1] == ["Bee", "cat", "dog", "emu"]  # cut off: fine


@pytest.mark.parametrize("cache", ["off", "auto"])
def test_a_symlink_loop_in_an_image_folder_is_one_line_or_left_out_and_counted_with_skip(tmp_path, capsys, cache):
    make_folders(tmp_path)
    loop = tmp_path / "photo" / "cat" / "loop.jpg"
    loop.symlink_to("loop.jpg")  # points to itself: stat fails with ELOOP
    data = DataConfig(name="folders", root=tmp_path, cache=cache)
    with pytest.raises(UserError) as refused:
        build_federated_data(data, FederationConfig(), 0, DATA_CONFIG)
    message = str(refused.value)
    assert message.startswith(f"cannot read image {loop}: ") and "symbolic links" in message
    assert "data.on_bad_image=skip" in message and "\n" not in message

    skipping = build_federated_data(dataclasses.replace(data, on_bad_image="skip"), FederationConfig(), 0, DATA_CONFIG)
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "left out 1 file(s)" in warning[0] and str(loop) in warning[0]
    images = sum(client.num_samples for client in skipping.clients) + sum(map(len, skipping.test.values()))
    assert images == 50  # every real image is there, the link is not
    for client in skipping.clients:
        assert len(list(make_loader(client.dataset, 4, shuffle=False, seed=0, num_workers=0))) > 0
