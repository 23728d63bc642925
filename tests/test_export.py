"""The exported global model means what lorafair meant: timm and peft alone give lorafair's logits; evaluate repeats
results.json; predict and the loading code of docs/using.md agree with it; bad input is one line and exit code 2."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models.mlp_mixer import MlpMixer

from lorafair.cli import main
from lorafair.export import export_run, global_model, open_run
from lorafair.federated.run_folder import EXPORT_NAME, read_fit_config
from lorafair.fit import fit
from lorafair.inference import evaluate_run, predict
from tests.helpers import ROOT, parse_fit_args, tiny_config

pytestmark = pytest.mark.xdist_group("test_export")
"""One pytest-xdist worker runs this module, so its module fixtures (runs of fit) are built once."""

DEMO_ARGS = ["--config", str(ROOT / "configs/demo_digits.yaml"), "--federation.rounds", "2",
             "--client.max_local_steps", "4", "--server.steps", "50", "--client.lr", "0.1", "--lora.alpha", "32",
             "--server.method", "flora"]
"""The digits demo's pretrained backbone, briefly fine-tuned hard enough that the methods' accuracies differ."""


LOGIT_TOLERANCE = 1e-5
"""The merged model computes (W + s B A) x where lorafair computes W x + s B (A x): the same sum, reassociated in
float32 (eps 1.2e-7), over a few layers of width 32: differences of a few 1e-7 on logits of size ~1. The adapter
path runs the very same operations as lorafair's model and must match bit for bit."""


LOAD_WITH_TIMM_AND_PEFT = """
import contextlib, io, json, os, sys
import timm, torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from timm.models.mlp_mixer import MlpMixer


images_file, logits_file, readme_dir, readme_code, *folders = sys.argv[1:]
images = load_file(images_file)["images"]
logits = {}
for position, folder in enumerate(folders):
    merged = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    config = json.load(open(f"{folder}/config.json"))
    plain = timm.create_model(config["architecture"], **config["model_args"])
    plain.load_state_dict(load_file(f"{folder}/model.safetensors"), strict=True)
    base = timm.create_model(f"local-dir:{folder}/base", pretrained=True)
    adapted = PeftModel.from_pretrained(base, f"{folder}/adapter").eval()
    with torch.no_grad():
        logits[f"{position}/merged"] = merged(images)
        logits[f"{position}/plain"] = plain.eval()(images)
        logits[f"{position}/adapter"] = adapted(images)
save_file(logits, logits_file)
os.chdir(readme_dir)
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    exec(readme_code, {})
assert not any(name.startswith("lorafair") for name in sys.modules), "the loading code imported lorafair"
print(printed.getvalue())
"""
"""Loads every export of `folders` with timm and peft, then runs the docs' snippet in `readme_dir`: one Python
process without lorafair for all the loading code (starting one costs more than everything it computes)."""


@dataclass
class PlainLoading:
    """What the loading code computed in a process without lorafair."""

    images: torch.Tensor
    logits: dict[str, torch.Tensor]
    """"<position of the method run>/<merged|plain|adapter>" -> logits of `images`."""
    readme_printed: list[str]
    readme_image: Path


@pytest.fixture(scope="module")
def method_runs(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """The tiny job (random backbone) finished with LoRA-FAIR, FLoRA and FedEx-LoRA; fit exported each."""
    runs = {"lorafair": tiny_run[0]}
    for method in ("flora", "fedex_lora"):  # one round of two clients: merges and non-zero factors already
        out_dir = tmp_path_factory.mktemp(method)
        fit(tiny_config(out_dir, "--server.method", method, "--federation.rounds", "1",
                        "--federation.clients_per_round", "2"))
        runs[method] = out_dir
    return runs


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("runs") / "demo"
    return out_dir, fit(parse_fit_args([*DEMO_ARGS, "--out_dir", str(out_dir)]))


@pytest.fixture(scope="module")
def digit_images(demo_run, tmp_path_factory) -> list[Path]:
    """Five random black-and-white PNG files of another size than the model's input, as a user would hand them over."""
    folder = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(5):
        ink = (rng.random((24, 24)) > 0.7).astype(np.uint8) * 255
        path = folder / f"digit_{index}.png"
        Image.fromarray(np.stack([ink] * 3, axis=-1)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def plain_loading(method_runs, demo_run, digit_images, tmp_path_factory) -> PlainLoading:
    """The three methods' exports and the snippet of docs/using.md (in a folder holding runs/demo and digit.png),
    loaded in one process that never imports lorafair."""
    folder = tmp_path_factory.mktemp("plain_loading")
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    save_file({"images": images}, folder / "images.safetensors")
    readme_dir = folder / "readme"
    (readme_dir / "runs").mkdir(parents=True)
    (readme_dir / "runs/demo").symlink_to(demo_run[0])
    shutil.copy(digit_images[1], readme_dir / "digit.png")
    code = docs_block("using.md")
    assert len(code.strip().splitlines()) <= 12 and "lorafair" not in code.replace("runs/demo", "")
    printed = subprocess.run([sys.executable, "-c", LOAD_WITH_TIMM_AND_PEFT, str(folder / "images.safetensors"),
                              str(folder / "logits.safetensors"), str(readme_dir), code,
                              *(str(run / EXPORT_NAME) for run in method_runs.values())],
                             check=True, cwd=folder, capture_output=True, text=True).stdout
    return PlainLoading(images, load_file(folder / "logits.safetensors"), printed.split(), digit_images[1])


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_timm_and_peft_alone_give_lorafair_logits_for_three_methods(method_runs, plain_loading):
    """Adapter path (timm base + PeftModel.from_pretrained) and merged path (timm local-dir, and create_model +
    load_state_dict(strict=True)) against the global model lorafair rebuilds, in a process without lorafair."""
    for position, run in enumerate(method_runs.values()):
        with torch.no_grad():
            expected = global_model(open_run(run, say=lambda _: None))(plain_loading.images)
        assert torch.equal(plain_loading.logits[f"{position}/adapter"], expected), run
        for path in ("merged", "plain"):
            torch.testing.assert_close(plain_loading.logits[f"{position}/{path}"], expected, rtol=0,
                                       atol=LOGIT_TOLERANCE)


def test_adapter_files_use_peft_names_and_merged_weights_fold_the_product(method_runs):
    """Keys as peft names them (adapter name stripped, head as modules_to_save); model.safetensors = base + s B A
    computed densely here from the adapter's own files."""
    folder = method_runs["fedex_lora"] / EXPORT_NAME
    config = json.loads((folder / "adapter/adapter_config.json").read_text())
    adapter = load_file(folder / "adapter/adapter_model.safetensors")
    base, merged = load_file(folder / "base/model.safetensors"), load_file(folder / "model.safetensors")
    layers = [f"blocks.{block}.{name}" for block in range(2) for name in ("attn.proj", "mlp.fc2")]
    assert set(adapter) == {f"base_model.model.{layer}.lora_{factor}.weight" for layer in layers for factor in "AB"
                            } | {"base_model.model.head.weight", "base_model.model.head.bias"}
    assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (4, 16, ["head"])
    assert set(merged) == set(base)
    scaling = config["lora_alpha"] / config["r"]
    for layer in layers:
        lora_a, lora_b = (adapter[f"base_model.model.{layer}.lora_{f}.weight"] for f in "AB")
        assert lora_b.abs().max() > 0
        torch.testing.assert_close(merged[f"{layer}.weight"], base[f"{layer}.weight"] + scaling * lora_b @ lora_a)
    torch.testing.assert_close(merged["head.weight"], adapter["base_model.model.head.weight"], rtol=0, atol=0)
    for name in set(base) - {f"{layer}.weight" for layer in layers}:
        assert torch.equal(merged[name], base[name]), name


def test_flora_export_has_an_empty_adapter_and_the_merges_in_base(demo_run):
    """FLoRA: B = 0 in the adapter; base/ differs from the shipped backbone file exactly in the adapted layers."""
    folder = demo_run[0] / EXPORT_NAME
    adapter = load_file(folder / "adapter/adapter_model.safetensors")
    assert all(tensor.abs().max() == 0 for name, tensor in adapter.items() if ".lora_B." in name)
    start = load_file(ROOT / "lorafair/assets/demo_vit.safetensors")
    base = load_file(folder / "base/model.safetensors")
    adapted = {name.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
               for name in adapter if ".lora_A." in name}
    assert len(adapted) == 8
    for name, tensor in base.items():
        if name.startswith("head."):
            continue
        assert torch.equal(tensor, start[name]) != (name in adapted), name
    card = (folder / "README.md").read_text()
    assert "adapter is empty" in card and "| mean |" in card
    assert json.loads((folder / "classes.json").read_text()) == [str(d) for d in range(10)]
    assert yaml.safe_load((folder / "config.yaml").read_text())["server"]["method"] == "flora"


def test_evaluate_reproduces_results_json_exactly(demo_run, capsys):
    run_dir, results = demo_run
    code, out, _ = _run_main(["evaluate", "--run", str(run_dir)], capsys)
    assert code == 0
    assert f"{100 * results['final']['mean_accuracy']:7.2f}" in out
    assert evaluate_run(run_dir, say=lambda _: None) == {key: results["final"][key]
                                                         for key in ("accuracy", "mean_accuracy")}


def test_evaluate_an_older_round_and_the_export_folder(demo_run):
    run_dir, results = demo_run
    first = evaluate_run(run_dir, round=1, say=lambda _: None)
    assert first["accuracy"] == results["rounds"][0]["accuracy"]
    exported = evaluate_run(run_dir / EXPORT_NAME, say=lambda _: None)["accuracy"]
    for domain, accuracy in results["final"]["accuracy"].items():  # float32 reassociation may flip one image
        assert abs(exported[domain] - accuracy) <= 1 / 50


def test_evaluate_on_other_data_settings(demo_run, capsys):
    run_dir, results = demo_run
    code, out, _ = _run_main(["evaluate", "--run", str(run_dir), "--data.domains", "[rotated]",
                              "--data.eval_batch_size", "7"], capsys)
    assert code == 0
    assert f"rotated  {100 * results['final']['accuracy']['rotated']:7.2f}" in out and "plain" not in out
    code, _, err = _run_main(["evaluate", "--run", str(run_dir), "--data.num_classes", "5"], capsys)
    assert code == 2 and "classes" in err and len(err.strip().splitlines()) == 1


def test_predict_matches_the_exported_model_with_timms_preprocessing(demo_run, digit_images, tmp_path, capsys):
    """Probabilities equal those of the exported timm model fed by timm's transform from the export's config.json;
    batches of 2 give what one batch gives; the CSV holds k rows per image, most probable first."""
    run_dir = demo_run[0]
    code, out, _ = _run_main(["predict", "--run", str(run_dir), str(digit_images[0].parent), "--top_k", "3",
                              "--batch_size", "2", "--output", str(tmp_path / "p.csv")], capsys)
    assert code == 0 and len(out.strip().splitlines()) == len(digit_images)
    with open(tmp_path / "p.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * len(digit_images)
    predictions = predict(run_dir, digit_images, top_k=10, say=lambda _: None)
    model = timm.create_model(f"local-dir:{run_dir / EXPORT_NAME}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    for prediction, path in zip(predictions, digit_images, strict=True):
        with torch.no_grad():
            expected = model(transform(Image.open(path).convert("RGB"))[None]).softmax(-1)[0]
        got = torch.zeros(10)
        for name, value in prediction.top:
            got[int(name)] = value
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        first = [row for row in rows if row["image"] == str(path)]
        assert [row["class"] for row in first] == [name for name, _ in prediction.top[:3]]


def docs_block(page: str) -> str:
    """The first Python code block of a documentation page."""
    text = (ROOT / "docs" / page).read_text()
    return re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)


def test_readme_loading_code_runs_and_agrees_with_predict(demo_run, plain_loading):
    """The timm + peft snippet of docs/using.md, run as written in a folder holding runs/demo and digit.png."""
    name, probability = predict(demo_run[0], [plain_loading.readme_image], top_k=1, say=lambda _: None)[0].top[0]
    assert plain_loading.readme_printed[0] == name
    assert abs(float(plain_loading.readme_printed[1]) - probability) < 1e-3


def _one_line_error(argv: list[str], capsys, expected: str) -> None:
    code, _, err = _run_main(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_bad_input_is_one_line_and_exit_code_2(demo_run, digit_images, tmp_path, capsys):
    run_dir = demo_run[0]
    _one_line_error(["export", "--run", str(tmp_path)], capsys, "is not a lorafair run folder")
    _one_line_error(["evaluate", "--run", str(run_dir), "--round", "9"], capsys, "round(s) 1, 2 only")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    _one_line_error(["predict", "--run", str(run_dir), str(digit_images[0]), str(bad)], capsys,
                    f"cannot read image {bad}")
    _one_line_error(["predict", "--run", str(run_dir), str(tmp_path / "missing.png")], capsys, "does not exist")
    before = (run_dir / EXPORT_NAME / "model.safetensors").read_bytes()
    _one_line_error(["export", "--run", str(run_dir), "--round", "1"], capsys, "already exists; pass --overwrite")
    assert (run_dir / EXPORT_NAME / "model.safetensors").read_bytes() == before


def test_export_of_an_older_round_and_overwrite(demo_run, tmp_path, capsys):
    run_dir = demo_run[0]
    out = tmp_path / "round1"
    code, out_text, _ = _run_main(["export", "--run", str(run_dir), "--round", "1", "--out", str(out)], capsys)
    assert code == 0 and "round 1" in out_text
    first = load_file(out / "model.safetensors")
    assert not torch.equal(first["blocks.0.mlp.fc2.weight"],
                           load_file(run_dir / EXPORT_NAME / "model.safetensors")["blocks.0.mlp.fc2.weight"])
    assert main(["export", "--run", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["round1"]  # no staging folder left behind
    assert "round 2" in (out / "README.md").read_text()


def test_unfinished_run_uses_its_newest_checkpoint_and_says_so(demo_run, tmp_path):
    run_dir = tmp_path / "unfinished"
    shutil.copytree(demo_run[0], run_dir, ignore=shutil.ignore_patterns(EXPORT_NAME, "tensorboard"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["federation"]["rounds"] = 5
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    said = []
    export_run(run_dir, say=said.append)
    assert said[0] == f"{run_dir} is unfinished: using its newest checkpoint, round 2 of 5"
    assert (run_dir / EXPORT_NAME / "adapter/adapter_model.safetensors").is_file()


def test_mixer_built_from_kwargs_exports_plain_state_dicts(tmp_path):
    """model.name mlp_mixer has no timm registry name: the folders hold model.safetensors for MlpMixer(**kwargs)."""
    kwargs = {"img_size": 16, "patch_size": 4, "num_blocks": 2, "embed_dim": 32}
    fit(tiny_config(tmp_path, "--model.name", "mlp_mixer", "--model.kwargs", json.dumps(kwargs),
                    "--federation.rounds", "1", "--federation.clients_per_round", "2"))
    folder = tmp_path / EXPORT_NAME
    merged, base = MlpMixer(num_classes=10, **kwargs).eval(), MlpMixer(num_classes=10, **kwargs)
    merged.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    base.load_state_dict(load_file(folder / "base/model.safetensors"), strict=True)
    adapted = PeftModel.from_pretrained(base, str(folder / "adapter")).eval()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = global_model(open_run(tmp_path))(images)
        assert torch.equal(adapted(images), expected)
        torch.testing.assert_close(merged(images), expected, rtol=0, atol=LOGIT_TOLERANCE)


def test_run_config_reads_back_as_the_fit_config(tiny_run):
    """config.yaml read back equals the FitConfig the command line built: sections, paths and the method's options."""
    cfg = read_fit_config(tiny_run[0])
    assert cfg == tiny_config(tiny_run[0])
    assert isinstance(cfg.out_dir, Path) and cfg.server.steps == 50
