"""What a run leaves behind: config.yaml, classes.json, results.json, TensorBoard scalars and the final table.

results.json is rewritten atomically after every round, so a reader (or `lorafair report`) never sees half a file:
{"method", "domains", "rounds": [per-round record], "final": {"round", "accuracy", "mean_accuracy"}};
"final" appears once the last round is done.
Accuracies are fractions in [0, 1]; bytes are per client per round.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as nested plain values (paths as strings), ready for YAML, JSON and checkpoints."""
    def plain(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return str(value)
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [plain(item) for item in value]
        return value

    return plain(dataclasses.asdict(cfg))


def flatten_dict(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"name": x}} -> {"model.name": x}: one level, the config sections (model.kwargs stays a dict)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping) and not prefix:
            flat.update(flatten_dict(value, prefix=f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see either the old or the new content, never a mix."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    write_text_atomic(path, yaml.safe_dump(dict(data), sort_keys=False))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def tensorboard_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one round's record, named for TensorBoard's grouping (accuracy/clipart, seconds/train, ...)."""
    scalars: dict[str, float] = {}
    if "accuracy" in record:
        scalars.update({f"accuracy/{domain}": acc for domain, acc in record["accuracy"].items()})
        scalars["accuracy/mean"] = record["mean_accuracy"]
    losses = record["train_loss"]
    scalars.update({f"train_loss/client_{client}": loss for client, loss in losses.items()})
    if losses:
        scalars["train_loss/mean"] = mean(list(losses.values()))
    scalars["bytes/up_per_client"] = record["bytes_up"]
    scalars["bytes/down_per_client"] = record["bytes_down"]
    scalars["bad_updates"] = len(record["bad_updates"])
    scalars.update({f"seconds/{phase}": seconds for phase, seconds in record["seconds"].items()})
    scalars["seconds/overhead_fraction"] = record["overhead"]
    scalars.update({f"aggregation/{name}": value for name, value in record["aggregation"].items()})
    return scalars


def accuracy_table(accuracy: Mapping[str, float], mean_accuracy: float, title: str) -> str:
    """Per-domain top-1 (in percent, as the paper reports it) and the mean, as an aligned text table."""
    rows = [*accuracy.items(), ("mean", mean_accuracy)]
    width = max(len("domain"), *(len(domain) for domain, _ in rows))
    lines = [title, f"{'domain':<{width}}  top-1 %", f"{'-' * width}  -------"]
    lines += [f"{domain:<{width}}  {100 * value:7.2f}" for domain, value in rows]
    return "\n".join(lines)
