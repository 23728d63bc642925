"""The global model leaves lorafair: files that timm (or transformers) and peft load on their own.

A run's global model is its frozen backbone (the starting weights plus every merge FLoRA or FedEx-LoRA made), the
global LoRA factors and the trained head. `export_run` reads it back from a round checkpoint and writes

    base/                 the backbone the adapter applies to (merges folded in, trained head), in its library's layout
    adapter/              the LoRA factors and the head, as peft's save_pretrained writes them
    config.json, model.safetensors   the whole model with the adapter folded in, in its library's layout
    config.yaml, classes.json, README.md
    .lorafair_export      the marker of an export: an existing `out` is replaced only when it carries one

`export_run(..., client=K)` writes client K's own model the same way, where the run's clients keep tensors of their
own (FedSA-LoRA: its B; the local bound: everything): the global model with what the client keeps in its place.

The library's layout is timm's folder (`save_for_hf`) for images, and `save_pretrained` of the model and its
tokenizer for a language model. The model-family part is small on purpose: `write_export` takes a plain model, the
adapter and a `save_model` function, so every family exports alike.
The adapter and the merged model are made by peft itself (`get_peft_model`, `save_pretrained`, `merge_and_unload`),
so the files are what peft would write.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import save_file
from timm.models import save_for_hf
from torch import Tensor, nn

from lorafair.aggregation import Aggregator, build_aggregator, method_class, registered_methods
from lorafair.config import FitConfig, metric_name
from lorafair.data import model_data_config
from lorafair.errors import UserError
from lorafair.federated.checkpoints import check_fits, kept_rounds, load_checkpoint, read_round
from lorafair.federated.run_folder import (
    CLASSES_NAME,
    CONFIG_NAME,
    EXPORT_MARKER,
    EXPORT_NAME,
    GLOBAL_MODEL,
    checkpoint_dir,
    hold_folder,
    is_export,
    read_fit_config,
    refuse_shared_folder,
)
from lorafair.federated.state import GlobalState, ResumeState, is_local
from lorafair.files import current_umask, is_disk_full, write_json
from lorafair.keys import peft_key
from lorafair.models.build import build_model, state_shapes
from lorafair.models.image import LoraClassifier
from lorafair.models.lora import peft_config
from lorafair.weights import head_parameter_names

if TYPE_CHECKING:
    from lorafair.models.text import TextLoraModel

SaveModel = Callable[[nn.Module, Path], None]
"""Writes a plain model as a folder its own library loads (timm: config.json + model.safetensors)."""


@dataclass
class RunState:
    """One round's global state of a run folder, as its checkpoint holds it."""

    run_dir: Path
    cfg: FitConfig
    classes: list[str]
    saved: ResumeState
    """The round, its results so far and the global model then (LoRA pairs, head, merged frozen weights)."""
    clients: dict[int, str]
    """The run's clients: id -> domain."""


@dataclass
class LoraAdapter:
    """What peft needs to rebuild an adapter, keyed by the model's own names: its settings, (A, B) per adapted
    module and the tensors of the modules trained in full (`config.modules_to_save`, e.g. the head)."""

    config: PeftLoraConfig
    factors: dict[str, tuple[Tensor, Tensor]]
    trained: dict[str, Tensor]

    def peft_state(self) -> dict[str, Tensor]:
        """The adapter under the names peft's save_pretrained uses (adapter name left out)."""
        factors = {peft_key(name, factor): tensor
                   for name, pair in self.factors.items() for factor, tensor in zip("AB", pair, strict=True)}
        return {f"base_model.model.{name}": tensor for name, tensor in {**factors, **self.trained}.items()}


# ---- reading a run ----------------------------------------------------------------------------------------------


def open_run(run_dir: Path, round_index: int | None = None, say: Callable[[str], None] = print) -> RunState:
    """The checkpoint of `round_index` (default: the newest) of a run folder, with the run's settings.

    An unfinished run gives its newest checkpoint and says which round that is. A run whose results say it has no
    global model (`GLOBAL_MODEL`: under Flower, what its clients keep never reached the server) is refused: its
    checkpoints hold the server's part of the model only, which would load as a model nobody trained.
    """
    run_dir = Path(run_dir)
    kept = kept_rounds(checkpoint_dir(run_dir))
    if not (run_dir / CONFIG_NAME).is_file() or not kept:
        raise UserError(f"{run_dir} is not a lorafair run folder (it needs {CONFIG_NAME} and checkpoints/"
                        f"round_NNNNN.ckpt, as `lorafair fit --out_dir {run_dir}` writes them)")
    cfg = read_fit_config(run_dir)
    try:
        classes = json.loads((run_dir / CLASSES_NAME).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{run_dir}: cannot read the run's {CLASSES_NAME} ({err})") from err
    if round_index is None:
        round_index = max(kept)
        if round_index < cfg.federation.rounds:
            say(f"{run_dir} is unfinished: using its newest checkpoint, round {round_index} of "
                f"{cfg.federation.rounds}")
    elif round_index not in kept:
        raise UserError(f"--round {round_index}: {run_dir} keeps the checkpoints of round(s) "
                        f"{', '.join(map(str, sorted(kept)))} only (a run keeps its newest two); choose one of those")
    path = kept[round_index]
    state = load_checkpoint(path)
    saved = read_round(path, state)
    missing = state["results"].get(GLOBAL_MODEL)
    if missing is not None:
        raise UserError(f"{run_dir} has no model to load, its global model being {missing}. Its checkpoints hold only "
                        f"the server's factors, with the initial ones where the clients keep their own: for a model, "
                        f"run the same config with `lorafair fit`, then `lorafair export --run RUN` writes the global "
                        f"model and `--client ID` a client's own")
    clients = {entry["id"]: entry["domain"] for entry in state["results"].get("clients", [])}
    return RunState(run_dir, cfg, classes, saved, clients)


def global_model(run: RunState, client: int | None = None) -> LoraClassifier | TextLoraModel:
    """The run's global model as the round loop held it: the client model built alike, with the round's state;
    with `client`, that client's own model (`client_state`)."""
    model = build_model(run.cfg, len(run.classes), torch.device("cpu"))
    saved = run.saved
    check_fits(saved, state_shapes(model))
    if saved.base:
        model.load_base_state(saved.base)
    state = saved.state if client is None else client_state(run, client)
    model.set_lora(state.lora)
    model.set_extra(state.extra)
    return model.eval()


def client_state(run: RunState, client: int) -> GlobalState:
    """What `client` starts the round after the checkpoint's from, its own model: the global state with the tensors
    it keeps (`client_states` of the checkpoint) in their place. UserError where the run's clients keep nothing of
    their own, `client` is not one of the run's clients, or it has nothing of its own yet, and where it mixes in a
    local adapter per input (`ClientRule.local`)."""
    saved, method = run.saved, run.cfg.server.method
    if not saved.client_states and build_aggregator(method).client_rule(saved.round).local is not None:
        raise UserError(f"--client {client}: the clients of {run.run_dir} ({method}) mix a local adapter of their own "
                        "with the global one, weighted per input, which a peft adapter cannot hold (and which its "
                        "checkpoints do not hold: under Flower it stays in each node's state); leave out --client "
                        "to export the global model")
    if not saved.client_states:
        raise UserError(f"--client {client}: the clients of {run.run_dir} ({method}) keep nothing of their own "
                        f"between rounds, so each client's model is the global one; leave out --client to export it")
    if client not in run.clients:
        raise UserError(f"--client {client}: {run.run_dir} has no client {client}; its clients are "
                        f"{', '.join(map(str, sorted(run.clients))) or 'not listed in its checkpoint'}")
    own = saved.client_states.get(client)
    if own is None:
        raise UserError(f"--client {client}: client {client} had not trained by round {saved.round}, so it holds "
                        f"nothing of its own yet; export a later round or another client")
    if any(is_local(key) for key in own):
        raise UserError(f"--client {client}: a client of {run.run_dir} ({method}) mixes a local adapter of its own "
                        "with the global one, weighted per input, which a peft adapter cannot hold; leave out "
                        "--client to export the global model")
    held = saved.state.tensors()
    if any(held[key].shape != tensor.shape for key, tensor in own.items()):
        raise UserError(f"--client {client}: client {client} trains at a LoRA rank below lora.r "
                        f"({run.cfg.lora.r}), which the export does not write; export a client of rank "
                        f"{run.cfg.lora.r}")
    return saved.state.overlaid(own, run.cfg.lora.r)


def global_adapter(run: RunState, model: LoraClassifier | TextLoraModel) -> LoraAdapter:
    """The global LoRA factors with peft settings matching the client model's, the head saved beside them (a
    timm head; a classifier's modules outside the transformer body; nothing for a causal LM, whose adapter is
    typed CAUSAL_LM so that peft loads it with generation)."""
    extra = model.get_extra()
    if run.cfg.is_language_model:
        trained = sorted({name.split(".")[0] for name in extra}) or None
        task = None if run.cfg.is_text_classifier else "CAUSAL_LM"
    else:
        trained, task = [head_parameter_names(model.backbone)[0].rsplit(".", 1)[0]], None
    return LoraAdapter(peft_config(run.cfg.lora, model.layer_names, trained, task), model.get_lora(), extra)


# ---- writing --------------------------------------------------------------------------------------------------


def write_export(base: nn.Module, adapter: LoraAdapter, folder: Path, save_model: SaveModel) -> None:
    """base/ (the plain model), adapter/ (peft's save_pretrained) and the merged model at the top of `folder`."""
    save_model(base, folder / "base")
    peft_model = get_peft_model(copy.deepcopy(base), adapter.config)
    loaded = set_peft_model_state_dict(peft_model, adapter.peft_state())
    if loaded.unexpected_keys:
        raise ValueError(f"the adapter does not fit the model: {loaded.unexpected_keys[:3]}")
    peft_model.save_pretrained(str(folder / "adapter"))
    save_model(peft_model.merge_and_unload(), folder)


def timm_saver(classes: list[str], data_config: dict) -> SaveModel:
    """Writes config.json (architecture, model args, class names, preprocessing) and model.safetensors.

    A model timm's factory did not build (model.name mlp_mixer: MlpMixer from model.kwargs) has no registry name
    for config.json to give; its folder holds model.safetensors alone, for MlpMixer(**kwargs).load_state_dict.
    """
    def save(model: nn.Module, folder: Path) -> None:
        if not hasattr(model, "pretrained_cfg"):
            folder.mkdir(parents=True, exist_ok=True)
            save_file(model.state_dict(), str(folder / "model.safetensors"))
            return
        save_for_hf(model, str(folder), model_config={"label_names": list(classes)}, data_config=data_config,
                    safe_serialization=True)
    return save


def transformers_saver(tokenizer) -> SaveModel:
    """Writes the model's save_pretrained folder (config.json, model.safetensors, generation settings) and the
    tokenizer beside it, so that Auto classes load the folder on its own."""
    def save(model: nn.Module, folder: Path) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
    return save


def export_run(run_dir: Path, round: int | None = None, out: Path | None = None, overwrite: bool = False,
               say: Callable[[str], None] = print, client: int | None = None) -> Path:
    """Export the global model of a run (its newest checkpoint, or `round`) to `out` (default run_dir/final); with
    `client`, that client's own model (default folder run_dir/final_client<id>)."""
    out = Path(out) if out is not None else Path(run_dir) / client_export_name(client)
    check_export_out(out, overwrite)
    run = open_run(run_dir, round, say)
    _export(run, out, overwrite, client, say)
    return out


def export_final(run_dir: Path, say: Callable[[str], None] = print) -> Path:
    """The export `fit` ends with: the run's last round into run_dir/final, replacing an earlier export there; where
    the clients keep tensors of their own, it says how to export a client's own model."""
    out = Path(run_dir) / EXPORT_NAME
    run = open_run(run_dir, say=say)
    _export(run, out, True, None, say)
    if run.saved.client_states:
        say(f"each client keeps a model of its own: `lorafair export --run {run_dir} --client ID` writes client ID's "
            f"to {run_dir}/{EXPORT_NAME}_clientID")
    return out


def _export(run: RunState, out: Path, overwrite: bool, client: int | None, say: Callable[[str], None]) -> None:
    if client is not None:
        client_state(run, client)  # refuse before anything is written
    into_run = out.resolve().is_relative_to(run.run_dir.resolve())
    with hold_folder(run.run_dir, "--run") if into_run else contextlib.nullcontext():  # no fit writes there meanwhile
        check_export_out(out, overwrite)
        _write_export_folder(run, out, client)
    whose = "the global model" if client is None else f"client {client}'s own model"
    say(f"exported {whose} of round {run.saved.round} to {out}")


def client_export_name(client: int | None) -> str:
    """The export folder's name in a run folder: final, or final_client<id> for a client's own model."""
    return EXPORT_NAME if client is None else f"{EXPORT_NAME}_client{client}"


def check_export_out(out: Path, overwrite: bool) -> None:
    """Refuse an export folder that exists (without `overwrite`), or that is not an earlier export."""
    refuse_shared_folder(out, "--out")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or --out another folder")
    if out.exists() and not is_export(out):
        raise UserError(f"{out} is not a lorafair export (no {EXPORT_MARKER} in it): --overwrite replaces only an "
                        f"earlier export, never a run folder or a folder of other files; pass --out a new folder")


def _write_export_folder(run: RunState, out: Path, client: int | None) -> None:
    """Write the export (the global model, or `client`'s own) into a staging folder beside `out`, then put it in
    place of `out`."""
    model = global_model(run, client)
    if run.cfg.is_language_model:
        save_model = transformers_saver(model.tokenizer)
    else:
        save_model = timm_saver(run.classes, model_data_config(run.cfg.model, run.cfg.data.image_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the export is a folder like any other
    try:
        write_export(model.plain_backbone(), global_adapter(run, model), staging, save_model)
        shutil.copy(run.run_dir / CONFIG_NAME, staging / CONFIG_NAME)
        write_json(staging / CLASSES_NAME, run.classes)
        (staging / "README.md").write_text(model_card(run, client))
        write_json(staging / EXPORT_MARKER, {"lorafair": "export", "round": run.saved.round}
                   | ({} if client is None else {"client": client}))
    except Exception as err:
        if is_disk_full(err):
            raise UserError(f"no space left on the device to write the export {out}; "
                            f"{'the earlier export there is unchanged' if out.exists() else 'nothing was put there'}: "
                            f"free space, then run the same command again") from err
        raise
    else:
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- the model card ---------------------------------------------------------------------------------------------

def model_card(run: RunState, client: int | None = None) -> str:
    """A short README.md: base model, method, data, rounds, accuracy per domain and how to reproduce and load; for
    `client`'s own model, its own model's score on its own domain."""
    cfg = run.cfg
    evaluated = [record for record in run.saved.records if "accuracy" in record]
    model = f"- global model: {_global_model(cfg.server.method)}"
    if client is not None:
        model = (f"- client {client}'s own model (domain {run.clients[client]}): the global model with the tensors "
                 "this client keeps of its own in their place")
    weights = cfg.model.weights or ("timm pretrained weights" if cfg.model.pretrained else "random initialisation")
    whose = "" if client is None else f": client {client}'s own model"
    lines = [f"# {cfg.server.method} fine-tune of {cfg.model.name}{whose}", "",
             f"- base model: `{cfg.model.name}` {cfg.model.kwargs or ''}, weights: {weights}",
             f"- method: `{cfg.server.method}`, LoRA rank {cfg.lora.r}, alpha {cfg.lora.alpha}",
             f"- data: `{cfg.data.name}` ({len(run.classes)} classes), partition `{cfg.federation.partition}`",
             f"- rounds: {run.saved.round} of {cfg.federation.rounds}, seed {cfg.seed}",
             model, ""]
    if evaluated and client is None:
        lines += _score_lines(evaluated[-1], metric_name(cfg.data.name))
    elif evaluated:
        lines += _own_score_lines(evaluated[-1], run.clients[client], metric_name(cfg.data.name))
    option = "" if client is None else f" --client {client}"
    lines += ["Produced by `lorafair fit --config config.yaml` (the run's resolved config, beside this file) and "
              f"exported with `lorafair export --run RUN --round {run.saved.round}{option}`.", "", _loading_line(run),
              ""]
    return "\n".join(lines)


def _global_model(method: str) -> str:
    """What the exported model of `method` is, as the method declares it (a method no longer registered: as an
    aggregator that never merges)."""
    return (method_class(method) if method in registered_methods() else Aggregator).global_model


def _score_lines(last: dict, metric: str) -> list[str]:
    """The table of a round's score per domain (`metric`: top-1 accuracy, or exact match for generated answers),
    with its eval loss if any."""
    losses = last.get("eval_loss")
    lines = [f"{metric[0].upper()}{metric[1:]} of the global model after round {last['round']}:", "",
             f"| domain | {metric.removesuffix(' accuracy')} % |" + (" eval loss |" if losses else ""),
             "| --- | --- |" + (" --- |" if losses else "")]
    lines += [f"| {domain} | {100 * value:.2f} |" + (f" {losses[domain]:.4f} |" if losses else "")
              for domain, value in last["accuracy"].items()]
    lines += [f"| mean | {100 * last['mean_accuracy']:.2f} |" + (f" {last['mean_eval_loss']:.4f} |" if losses else ""),
              ""]
    return lines


def _own_score_lines(last: dict, domain: str, metric: str) -> list[str]:
    """The line of a round's personalised score on `domain`: the mean over its clients' own models (the local
    bound's scores are its clients' own models')."""
    scores = last.get("personalised", last)["accuracy"]
    return [f"{metric[0].upper()}{metric[1:]} after round {last['round']} of the own models of the clients of "
            f"domain {domain}, on its test set: {100 * scores[domain]:.2f} %", ""]


def _loading_line(run: RunState) -> str:
    if not run.cfg.is_language_model:
        return ("Load with timm alone: `timm.create_model('local-dir:FOLDER', pretrained=True)`; with peft: "
                "`PeftModel.from_pretrained(timm.create_model('local-dir:FOLDER/base', pretrained=True), "
                "'FOLDER/adapter')`.")
    auto = "AutoModelForSequenceClassification" if run.cfg.is_text_classifier else "AutoModelForCausalLM"
    return (f"Load with transformers alone: `{auto}.from_pretrained('FOLDER')` and "
            "`AutoTokenizer.from_pretrained('FOLDER')`; with peft: "
            f"`PeftModel.from_pretrained({auto}.from_pretrained('FOLDER/base'), 'FOLDER/adapter')`.")
