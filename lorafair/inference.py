"""Using a run's global model: `lorafair evaluate` scores it per domain, `lorafair predict` classifies images.

Both take a run folder (the model is rebuilt from a round checkpoint exactly as the trainer held it, so evaluating on
the run's own data repeats results.json) or a folder `lorafair export` wrote (its merged timm model).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from lorafair.config import DataConfig, FitConfig
from lorafair.data import build_federated_data, make_loader, model_data_config
from lorafair.data.cache import UNREADABLE_IMAGE, rgb_image
from lorafair.data.image_files import IMAGE_SUFFIXES
from lorafair.data.transforms import image_transforms
from lorafair.errors import UserError
from lorafair.export import global_model, open_run
from lorafair.federated.run_folder import CLASSES_NAME, accuracy_table, mean, read_fit_config


@dataclass
class LoadedModel:
    """A global model ready to score, with the settings of the run that trained it."""

    model: nn.Module
    cfg: FitConfig
    classes: list[str]
    title: str
    """How the table names it, e.g. "run runs/demo, round 20"."""

    def data_config(self, image_size: int | None = None) -> dict:
        return model_data_config(self.cfg.model, image_size if image_size is not None else self.cfg.data.image_size)


def is_export(folder: Path) -> bool:
    """Whether `folder` holds a merged timm model as `lorafair export` writes it (not a run folder)."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def load_model(source: Path, round: int | None = None, say: Callable[[str], None] = print) -> LoadedModel:
    """The global model of a run folder (newest checkpoint, or `round`) or of an export folder."""
    source = Path(source)
    if not is_export(source):
        run = open_run(source, round, say)
        refuse_language_model(run.cfg, source)
        return LoadedModel(global_model(run), run.cfg, run.classes, f"run {source}, round {run.saved.round}")
    cfg = read_fit_config(source)
    refuse_language_model(cfg, source)
    if round is not None:
        raise UserError(f"--round: {source} is an exported model, which has no rounds; pass its run folder instead")
    try:
        classes = json.loads((source / CLASSES_NAME).read_text())
        model = timm.create_model(f"local-dir:{source}", pretrained=True)
    except (OSError, RuntimeError, TypeError, KeyError, ValueError) as err:
        raise UserError(f"{source} is not a complete `lorafair export` folder ({type(err).__name__}: {err})") from err
    return LoadedModel(model.eval(), cfg, classes, f"exported model {source}")


def refuse_language_model(cfg: FitConfig, source: Path) -> None:
    """evaluate and predict read images; a language model is scored by fit and by lm_eval."""
    if cfg.is_language_model:
        raise UserError(f"{source} holds a language model: evaluate and predict take image models; its scores per "
                        f"domain are in the run's results.json (accuracy, eval_loss), and `lorafair lm_eval --run RUN` "
                        f"scores it on lm-eval tasks")


def inference_device(cfg: FitConfig) -> tuple[torch.device, contextlib.AbstractContextManager]:
    """The device and autocast the run trained with (bf16-mixed on CUDA unless `precision` says otherwise)."""
    on_cuda = cfg.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    bf16 = (cfg.precision or ("bf16-mixed" if on_cuda else "32-true")) == "bf16-mixed"
    return device, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# ---- evaluate ---------------------------------------------------------------------------------------------------


def evaluate_run(source: Path, round: int | None = None, data: dict[str, Any] | None = None,
                 say: Callable[[str], None] = print) -> dict[str, Any]:
    """Top-1 of the global model on each domain's test split of the run's data, or of the run's data settings
    overridden by `data` ({"name": "folders", "root": ...}); prints the table `fit` prints and returns
    {"accuracy": {domain: top-1}, "mean_accuracy": m}."""
    loaded = load_model(source, round, say)
    cfg = loaded.cfg
    data_cfg = DataConfig(**{**dataclasses.asdict(cfg.data), **(data or {})})
    data_cfg.validate()
    federated = build_federated_data(data_cfg, cfg.federation if not data else dataclasses.replace(
        cfg.federation, partition="iid", num_clients=1), cfg.seed, loaded.data_config(data_cfg.image_size))
    if federated.classes != loaded.classes:
        raise UserError(f"the dataset's {len(federated.classes)} classes ({', '.join(federated.classes[:5])}, ...) "
                        f"are not the {len(loaded.classes)} the model was trained on ({', '.join(loaded.classes[:5])}"
                        f", ...); evaluate on data with the run's classes, in the same order")
    device, autocast = inference_device(cfg)
    model = loaded.model.to(device)
    accuracy = {}
    with torch.inference_mode(), autocast:
        for domain in federated.domains:
            correct = total = 0
            for images, labels in make_loader(federated.test[domain], data_cfg.eval_batch_size, shuffle=False,
                                              seed=0, num_workers=data_cfg.num_workers):
                correct += int((model(images.to(device)).argmax(dim=-1).cpu() == labels).sum())
                total += labels.numel()
            accuracy[domain] = correct / total
    result = {"accuracy": accuracy, "mean_accuracy": mean(list(accuracy.values()))}
    say(accuracy_table(accuracy, result["mean_accuracy"], f"{cfg.server.method}: {loaded.title}"))
    return result


# ---- predict ----------------------------------------------------------------------------------------------------


def image_files(paths: Sequence[Path]) -> list[Path]:
    """The images named: files as given, folders searched recursively for image files (sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"image {path} does not exist")
    if not found:
        raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return found


class ImageList(Dataset):
    """(pixels, position) of each image file; an unreadable file stops with its path."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        try:
            with Image.open(self.paths[index]) as image:
                return self.transform(rgb_image(image)), index
        except UNREADABLE_IMAGE as err:  # a decompression bomb (a 20000 x 20000 PNG) included
            raise UserError(f"cannot read image {self.paths[index]}: {err}; remove it or pass readable images"
                            ) from err


@dataclass
class Prediction:
    image: Path
    top: list[tuple[str, float]]
    """(class, probability), most probable first."""


def predict(source: Path, images: Sequence[Path], round: int | None = None, top_k: int = 5,
            output: Path | None = None, batch_size: int = 64, say: Callable[[str], None] = print) -> list[Prediction]:
    """The top-k classes with softmax probabilities of every image, with the run's evaluation preprocessing;
    printed one line per image and, with `output`, written as CSV rows (image, rank, class, probability)."""
    if top_k < 1:
        raise UserError(f"--top_k: must be >= 1, got {top_k}")
    if batch_size < 1:
        raise UserError(f"--batch_size: must be >= 1, got {batch_size}")
    if output is not None and Path(output).is_dir():
        raise UserError(f"--output {output} is a folder; name the CSV file to write, e.g. "
                        f"{Path(output) / 'predictions.csv'}")
    loaded = load_model(source, round, say)
    paths = image_files(images)
    eval_transform = image_transforms(loaded.data_config(), loaded.cfg.data)[1]
    loader = make_loader(ImageList(paths, eval_transform), batch_size, shuffle=False, seed=0,
                         num_workers=loaded.cfg.data.num_workers)
    device, autocast = inference_device(loaded.cfg)
    model = loaded.model.to(device)
    predictions = []
    with torch.inference_mode(), autocast:
        for pixels, positions in tqdm(loader, desc="predict", disable=len(loader) < 2, file=sys.stderr):
            probabilities = model(pixels.to(device)).float().softmax(dim=-1).cpu()
            values, labels = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
            predictions += [Prediction(paths[p], [(loaded.classes[c], v) for c, v in zip(ls, vs, strict=True)])
                            for p, ls, vs in zip(positions.tolist(), labels.tolist(), values.tolist(), strict=True)]
    for prediction in predictions:
        say(f"{prediction.image}: " + ", ".join(f"{name} {value:.3f}" for name, value in prediction.top))
    if output is not None:
        write_predictions_csv(Path(output), predictions)
    return predictions


def write_predictions_csv(path: Path, predictions: Sequence[Prediction]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "rank", "class", "probability"])
        writer.writerows(_csv_rows(predictions))


def _csv_rows(predictions: Sequence[Prediction]) -> Iterator[list]:
    for prediction in predictions:
        for rank, (name, value) in enumerate(prediction.top, 1):
            yield [str(prediction.image), rank, name, f"{value:.6f}"]
