"""What a run trained is what leaves it: evaluate and predict of a run whose adapter is non-zero repeat its
results.json, the export's head is the trained head of the last checkpoint (read from the file, not rebuilt by the
same code), and the Flower server's reply timeout reaches the grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image
from safetensors.torch import load_file

from lorafair import export as export_module
from lorafair.cli import main
from lorafair.export import global_model, open_run
from lorafair.federated.checkpoints import list_checkpoints
from lorafair.federated.run_folder import EXPORT_NAME
from lorafair.files import current_umask
from lorafair.fit import fit
from lorafair.inference import evaluate_run, predict
from tests.helpers import tiny_config

pytestmark = pytest.mark.xdist_group("test_inference")
"""One pytest-xdist worker runs this module, so its module fixtures (runs of fit) are built once."""


TINTS = {"c0": (20, -20, -20), "c1": (-20, 20, -20), "c2": (-20, -20, 20)}


def write_tinted_tree(root: Path) -> Path:
    """Two domains of three classes, 6 training and 4 test images each: grey tinted red, green or blue under heavy
    noise, hard enough that the trained adapter, not the head alone, gets every test image right."""
    rng = np.random.default_rng(0)
    for domain in ("a", "b"):
        for split, count in (("train", 6), ("test", 4)):
            lines = []
            for name, tint in TINTS.items():
                for i in range(count):
                    relative = f"{domain}/{name}/{split}{i}.png"
                    pixels = np.clip(128 + np.array(tint) + rng.integers(-100, 100, (20, 20, 3)), 0, 255)
                    (root / relative).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels.astype(np.uint8)).save(root / relative)
                    lines.append(relative)
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def fedit_run(tmp_path_factory) -> tuple[Path, dict, Path]:
    """FedIT (plain averaging: the global adapter is the clients' mean, B != 0, nothing merged into the backbone)
    on the tinted images; fit exports it to final/."""
    root = write_tinted_tree(tmp_path_factory.mktemp("tinted"))
    out_dir = tmp_path_factory.mktemp("fedit_run")
    fit(tiny_config(out_dir, "--data.name", "folders", "--data.root", str(root), "--federation.rounds", "2",
                    "--federation.clients_per_round", "null", "--server.method", "fedit", "--client.max_local_steps",
                    "4", "--client.lr", "0.1"))
    return out_dir, json.loads((out_dir / "results.json").read_text()), root


def test_the_run_has_a_non_zero_adapter(fedit_run):
    lora = global_model(open_run(fedit_run[0], say=lambda _: None)).get_lora()
    assert lora and all(float(b.abs().max()) > 0 for _, b in lora.values())


def test_evaluate_and_predict_of_a_run_with_a_non_zero_adapter_repeat_results_json(fedit_run, monkeypatch):
    run_dir, results, root = fedit_run
    final = {key: results["final"][key] for key in ("accuracy", "mean_accuracy")}
    assert evaluate_run(run_dir, say=lambda _: None) == final
    for domain, accuracy in final["accuracy"].items():
        images = [root / line for line in (root / f"{domain}_test.txt").read_text().split()]
        top = [prediction.top[0][0] for prediction in predict(run_dir, images, top_k=1, say=lambda _: None)]
        assert np.mean([name == image.parent.name for name, image in zip(top, images, strict=True)]) == accuracy

    def without_adapter(run):  # the planted bug: the global model with its adapter left out
        model = global_model(run)
        model.set_lora({name: (a, torch.zeros_like(b)) for name, (a, b) in model.get_lora().items()})
        return model

    monkeypatch.setattr("lorafair.inference.global_model", without_adapter)
    assert evaluate_run(run_dir, say=lambda _: None) != final  # so the comparison above does see the adapter


def test_the_exports_head_is_the_trained_head_of_the_last_checkpoint(fedit_run):
    run_dir = fedit_run[0]
    checkpoint = torch.load(list_checkpoints(run_dir / "checkpoints")[-1], weights_only=True)
    trained = {name.split("/", 1)[-1]: tensor for name, tensor in checkpoint["extra"].items()}
    assert set(trained) == {"head.weight", "head.bias"}, sorted(trained)
    merged = load_file(run_dir / EXPORT_NAME / "model.safetensors")
    adapter = load_file(run_dir / EXPORT_NAME / "adapter" / "adapter_model.safetensors")
    base = load_file(run_dir / EXPORT_NAME / "base" / "model.safetensors")
    for name, tensor in trained.items():
        assert torch.equal(merged[name], tensor), name
        assert torch.equal(base[name], tensor), name
        assert torch.equal(adapter[f"base_model.model.{name}"], tensor), name  # peft's modules_to_save
    fresh = export_module.build_model(open_run(run_dir, say=lambda _: None).cfg, 3, torch.device("cpu")).get_extra()
    assert not torch.equal(fresh[next(iter(fresh))], next(iter(checkpoint["extra"].values())))  # the head trained


class RecordingGrid:
    """Six nodes (10 + partition id) that answer the partition query and a training round with the global state
    they were sent, recording the timeout of every send_and_receive."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def get_node_ids(self) -> list[int]:
        return list(range(10, 16))

    def send_and_receive(self, messages, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for message in messages:
            if message.metadata.message_type == MessageType.QUERY:
                content = RecordDict({"metrics": MetricRecord({"partition-id": message.metadata.dst_node_id - 10})})
            else:
                content = RecordDict({"arrays": message.content["arrays"], "metrics": MetricRecord(
                    {"num-examples": 5, "train-loss": 1.0, "steps": 1, "skipped-images": 0})})
            replies.append(Message(content, reply_to=message))
        return replies


def test_the_flower_servers_reply_timeout_reaches_the_grid(tmp_path, monkeypatch):
    from lorafair.flower.app import make_server_app

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = tiny_config(tmp_path / "run", "--server.method", "fedit", "--federation.rounds", "2",
                      "--federation.clients_per_round", "2")
    grid, errors = RecordingGrid(), []
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"timeout": 17.5})
    make_server_app(lambda _: cfg, errors)(grid, context)
    assert errors == [] and (tmp_path / "run" / "results.json").is_file()
    assert grid.timeouts == [17.5, 17.5, 17.5]  # the partition query and both rounds


def test_the_export_folder_follows_the_umask_not_mkdtemps_0700(fedit_run):
    mode = (fedit_run[0] / EXPORT_NAME).stat().st_mode & 0o777
    assert mode == 0o777 & ~current_umask() and mode & 0o055, oct(mode)


@pytest.mark.parametrize("case", ["batch size 0", "output is a folder", "decompression bomb"])
def test_predict_bad_input_is_one_line(fedit_run, tmp_path, capsys, case):
    from tests.helpers import png_bomb

    run_dir, _, root = fedit_run
    image = str(root / "a" / "c0" / "test0.png")
    args, expected = {
        "batch size 0": (["--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
        "output is a folder": (["--output", str(tmp_path)], f"--output {tmp_path} is a folder; name the CSV file"),
        "decompression bomb": ([], "cannot read image"),
    }[case]
    if case == "decompression bomb":
        (tmp_path / "bomb.png").write_bytes(png_bomb())
        image = str(tmp_path / "bomb.png")
    assert main(["predict", "--run", str(run_dir), image, *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err
