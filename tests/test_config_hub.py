"""Every shipped config parses through the CLI and passes validation, and holds the settings it promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorafair.cli import main, parse
from lorafair.config_hub import list_configs
from tests.helpers import ROOT, parse_fit_args

CONFIGS = ROOT / "configs"
PAPER_MODELS = {"vit": "vit_base_patch16_224.augreg_in21k", "mixer": "mixer_b16_224.goog_in21k"}
PAPER_ROUNDS = {"domainnet": 50, "nicopp": 30}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_config_parses_and_validates(path):
    cfg = parse_fit_args(["--config", str(path)])
    assert cfg.out_dir == Path("runs") / path.stem


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
@pytest.mark.parametrize("dataset", sorted(PAPER_ROUNDS))
@pytest.mark.parametrize("label_skew", [False, True])
def test_paper_configs_hold_the_paper_settings(model, dataset, label_skew):
    stem = f"{model}_{dataset}" + ("_label_skew" if label_skew else "")
    cfg = parse_fit_args(["--config", str(CONFIGS / f"{stem}.yaml")])
    assert (cfg.model.name, cfg.model.weights, cfg.data.name) == (PAPER_MODELS[model], None, dataset)
    assert (cfg.lora.r, cfg.data.batch_size, cfg.federation.rounds) == (16, 128, PAPER_ROUNDS[dataset])
    client = cfg.client
    assert (client.lr, client.momentum, client.weight_decay, client.grad_clip) == (0.01, 0.9, 1e-5, 10.0)
    federation = cfg.federation
    if label_skew:
        assert (federation.partition, federation.clients_per_domain, federation.dirichlet_alpha) == (
            "feature_label", 5, 0.5)
        assert (federation.clients_per_round, client.local_epochs) == (18, 5)
    else:
        assert (federation.partition, federation.clients_per_round, client.local_epochs) == ("feature", None, 2)


@pytest.mark.parametrize(("name", "data"), [("demo", "shapes"), ("demo_digits", "digits"), ("demo_hetero", "shapes")])
def test_the_demos_run_offline_from_shipped_files(name, data):
    cfg = parse_fit_args(["--config", str(CONFIGS / f"{name}.yaml")])
    assert cfg.data.name == data and not cfg.model.pretrained and cfg.data.num_workers == 0 and cfg.cpu_threads == 1
    assert (CONFIGS.parent / cfg.model.weights).is_file() and cfg.resume == "auto"


def test_the_text_demo_runs_offline_from_shipped_files():
    cfg = parse_fit_args(["--config", str(CONFIGS / "demo_text.yaml")])
    assert cfg.data.name == "arithmetic" and not cfg.model.pretrained and cfg.model.resolved_family("arithmetic") == (
        "transformers")
    shipped = CONFIGS.parent / cfg.model.name
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in shipped.iterdir()}
    assert sum(path.stat().st_size for path in shipped.iterdir()) < 3_000_000


def test_a_config_can_be_printed_and_overridden(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "vit_domainnet.yaml"), "--server.method", "fedit", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "method: fedit" in printed and "name: vit_base_patch16_224.augreg_in21k" in printed


@pytest.mark.parametrize("name", list_configs())
def test_every_shipped_config_parses_by_name_through_the_cli(name):
    command = "compare" if name.startswith("paper/") else "fit"
    root = ["--data.root", "anywhere"] if "domainnet" in name or "nicopp" in name else []
    for spelling in (name, f"{name}.yaml"):
        _, args = parse([command, "--config", spelling, *root])
        assert args["cfg"] == parse([command, "--config", str(CONFIGS / f"{name}.yaml"), *root])[1]["cfg"]


def test_configs_lists_every_yaml_file_once(capsys):
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == sorted(p.relative_to(CONFIGS).with_suffix("").as_posix() for p in CONFIGS.rglob("*.yaml"))
    assert "paper/table1_vit_domainnet" in listed and "demo" in listed


def test_an_unknown_config_name_is_one_line_with_close_matches(capsys):
    assert main(["fit", "--config", "vit_domainet.yaml"]) == 2
    assert capsys.readouterr().err == ("lorafair: error: --config: vit_domainet.yaml is neither a file nor a shipped "
                                       "config; did you mean vit_domainnet, vit_domainnet_hetero, "
                                       "mixer_domainnet?\n")


def _federation(name: str) -> dict:
    """The federation section a shipped config declares (not its defaults)."""
    return (yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()).get("federation") or {})


COUNTED = [name for name in list_configs() if "num_clients" in _federation(name)
           or _federation(name).get("partition") == "iid"]
"""The shipped configs that state a number of clients (federation.num_clients, or the iid partition that reads it)."""
OFFLINE_DATA = ("digits", "shapes", "arithmetic")


@pytest.mark.parametrize("name", COUNTED)
def test_a_config_that_counts_its_clients_counts_them_right(name, capsys):
    """federation.num_clients is read by the iid partition only; a config stating it holds the number of clients
    its partition really makes, counted by `lorafair data` on the data built offline."""
    cfg = parse(["compare" if name.startswith("paper/") else "fit", "--config", name])[1]["cfg"]
    assert cfg.data.name in OFFLINE_DATA, f"{name} states federation.num_clients but its clients cannot be counted"
    assert main(["data", "--config", name]) == 0
    summary = capsys.readouterr().out.splitlines()[0]  # "arithmetic: 5 domains, 2 classes, 5 clients (...)"
    assert f", {cfg.federation.num_clients} clients (" in summary, summary
