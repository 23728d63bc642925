"""The fingerprints stored in checkpoints notice what docs/training.md says they notice: labels, files and weights."""

from __future__ import annotations

import os

import pytest
import timm
from PIL import Image
from safetensors.torch import save_file

from lorafair.config import DataConfig, FederationConfig, ModelConfig
from lorafair.data import build_federated_data
from lorafair.errors import UserError
from lorafair.federated.fingerprints import run_fingerprints, weights_fingerprint
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.fit import fit
from tests.helpers import DATA_CONFIG, make_domainnet, tiny_config, write_jpeg


def _fingerprints(root, cache):
    data = build_federated_data(DataConfig(name="domainnet", root=root, domains=["clipart", "sketch"], cache=cache),
                                FederationConfig(), 0, DATA_CONFIG)
    return run_fingerprints(data, ModelConfig())


def _swap_labels(split_file, first: int, second: int) -> None:
    """Exchange two labels in a split file: class counts stay equal, the labels of the files do not."""
    swap = {str(first): str(second), str(second): str(first)}
    lines = [line.rsplit(" ", 1) for line in split_file.read_text().splitlines()]
    split_file.write_text("".join(f"{path} {swap.get(label, label)}\n" for path, label in lines))


@pytest.mark.parametrize("cache", ["auto", "off"])
@pytest.mark.parametrize("change", ["swapped labels", "replaced image", "touched image", "swapped test labels"])
def test_the_data_fingerprint_notices_what_the_partition_fingerprint_misses(tmp_path, change, cache):
    make_domainnet(tmp_path)
    before = _fingerprints(tmp_path, cache)
    assert _fingerprints(tmp_path, cache) == before  # unchanged files: the same labels
    image = next(iter(sorted((tmp_path / "clipart" / "bat").glob("*train*.jpg"))))
    if change == "swapped labels":
        _swap_labels(tmp_path / "splits" / "clipart_train.txt", 0, 2)  # zebra and bat: 6 training images each
    elif change == "swapped test labels":
        _swap_labels(tmp_path / "splits" / "sketch_test.txt", 0, 2)
    elif change == "replaced image":
        stat = image.stat()
        Image.new("RGB", (30, 20), (1, 2, 3)).save(image, format="JPEG")
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old time: the size differs
        assert image.stat().st_size != stat.st_size
    else:
        stat = image.stat()
        write_jpeg(image, 2 * 7)  # the same pixels written again: only the modification time changes
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = _fingerprints(tmp_path, cache)
    assert after["partition"] == before["partition"]  # sizes and class counts alone miss every one of these
    assert after["data"] != before["data"]


def test_the_weights_fingerprint_is_name_size_and_time(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"12345")
    os.utime(path, ns=(0, 7))
    assert weights_fingerprint(path) == "w.safetensors, 5 bytes, modified 7" and weights_fingerprint(None) == "none"


def test_a_changed_weights_file_is_refused_on_resume_unless_forced(tmp_path, capsys):
    """The tiny job from a weights file: rewriting the file behind the same path stops the resume, naming it."""
    weights = tmp_path / "backbone.safetensors"
    backbone = timm.create_model("vit_base_patch16_224", num_classes=10, depth=2, embed_dim=32, num_heads=2,
                                 img_size=16, patch_size=4)
    save_file(backbone.state_dict(), weights)
    fit(tiny_config(tmp_path / "run", "--model.weights", str(weights), "--federation.rounds", "1"))
    stat = weights.stat()
    save_file({name: tensor + 1 for name, tensor in backbone.state_dict().items()}, weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    cfg = tiny_config(tmp_path / "run", "--model.weights", str(weights), "--resume", "auto")
    with pytest.raises(UserError, match=r"round_00001\.ckpt was written by a run with other settings \(weights: "
                                        r"'backbone\.safetensors, \d+ bytes, modified \d+' -> "):
        FederatedTrainer(cfg, launch_fabric(cfg)).start_or_resume()
    forced = fit(tiny_config(tmp_path / "run", "--model.weights", str(weights), "--resume", "auto",
                             "--resume_force", "true"))
    assert [record["round"] for record in forced["rounds"]] == [1, 2]
    assert "warning: resume_force: continuing from" in capsys.readouterr().out

