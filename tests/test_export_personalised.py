"""`lorafair export --client K`: a FedSA-LoRA client's own model (the global A, its own B, the global head) in the
layouts of the global export, loaded with timm and peft alone; clear refusals where there is no such model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lorafair.cli import main
from lorafair.federated.checkpoints import list_checkpoints
from lorafair.federated.run_folder import EXPORT_NAME, checkpoint_dir, read_fit_config
from lorafair.fit import fit
from lorafair.models.build import build_model
from tests.helpers import tiny_config

pytestmark = pytest.mark.xdist_group("test_export_personalised")


@pytest.fixture(scope="module")
def fedsa_run(tmp_path_factory) -> Path:
    """Two FedSA-LoRA rounds of 5 of the 6 clients: every client that trained keeps a B of its own."""
    out_dir = tmp_path_factory.mktemp("fedsa")
    fit(tiny_config(out_dir, "--server.method", "fedsa_lora"))
    return out_dir


def images() -> torch.Tensor:
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def loaded_logits(folder: Path) -> dict[str, torch.Tensor]:
    """The export's logits as a user gets them: timm's merged model and timm's base with peft's adapter."""
    merged = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    base = timm.create_model(f"local-dir:{folder}/base", pretrained=True)
    adapted = PeftModel.from_pretrained(base, str(folder / "adapter")).eval()
    with torch.no_grad():
        return {"merged": merged(images()), "adapter": adapted(images())}


def own_model_logits(run_dir: Path, client: int) -> torch.Tensor:
    """The client's model put together here from the raw checkpoint: its global A and head, the client's own B."""
    checkpoint = torch.load(list_checkpoints(checkpoint_dir(run_dir))[-1], weights_only=True)
    model = build_model(read_fit_config(run_dir), 10, torch.device("cpu"))
    model.set_lora({layer: (pair["A"], checkpoint["client_states"][f"client{client}.lora/{layer}/B"])
                    for layer, pair in checkpoint["lora"].items()})
    model.set_extra(checkpoint["extra"])
    with torch.no_grad():
        return model.eval()(images())


def trained_clients(run_dir: Path) -> list[int]:
    checkpoint = torch.load(list_checkpoints(checkpoint_dir(run_dir))[-1], weights_only=True)
    return sorted({int(key.split(".")[0].removeprefix("client")) for key in checkpoint["client_states"]})


def test_a_clients_export_gives_its_own_models_logits(fedsa_run, capsys):
    clients = trained_clients(fedsa_run)
    assert len(clients) >= 5
    client = clients[1]
    assert main(["export", "--run", str(fedsa_run), "--client", str(client)]) == 0
    folder = fedsa_run / f"{EXPORT_NAME}_client{client}"
    assert f"client {client}'s own model" in capsys.readouterr().out
    logits, expected = loaded_logits(folder), own_model_logits(fedsa_run, client)
    assert torch.equal(logits["adapter"], expected)
    torch.testing.assert_close(logits["merged"], expected, rtol=0, atol=1e-5)
    global_logits = loaded_logits(fedsa_run / EXPORT_NAME)["adapter"]
    assert (global_logits - expected).abs().max() > 1e-4  # its own B, not the mean of the clients' B
    assert json.loads((folder / ".lorafair_export").read_text())["client"] == client
    card = (folder / "README.md").read_text()
    assert f"client {client}'s own model" in card and f"--client {client}" in card


def test_two_clients_exports_differ_in_b_only(fedsa_run, tmp_path):
    """Each export's adapter holds the global A and head and that client's own B."""
    first, second = trained_clients(fedsa_run)[:2]
    adapters = []
    for client in (first, second):
        out = tmp_path / str(client)
        assert main(["export", "--run", str(fedsa_run), "--client", str(client), "--out", str(out)]) == 0
        adapters.append(load_file(out / "adapter/adapter_model.safetensors"))
    for name, tensor in adapters[0].items():
        assert torch.equal(tensor, adapters[1][name]) == (".lora_B." not in name), name


def test_refusals_name_the_problem_and_the_fix(fedsa_run, tiny_run, capsys):
    """A method whose clients keep nothing, and a client the run does not have: one line each, exit code 2,
    nothing written."""
    for run, client, words in ((tiny_run[0], 0, "keep nothing of their own"), (fedsa_run, 99, "has no client 99")):
        assert main(["export", "--run", str(run), "--client", str(client)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert not (run / f"{EXPORT_NAME}_client{client}").exists()


def test_the_local_bounds_client_export_holds_its_whole_state(tmp_path):
    """The local bound keeps every client's pair and head: its export's adapter holds exactly those."""
    run_dir = tmp_path / "local"
    fit(tiny_config(run_dir, "--federation.setting", "local", "--federation.rounds", "1"))
    client = trained_clients(run_dir)[0]
    assert main(["export", "--run", str(run_dir), "--client", str(client)]) == 0
    adapter = load_file(run_dir / f"{EXPORT_NAME}_client{client}/adapter/adapter_model.safetensors")
    checkpoint = torch.load(list_checkpoints(checkpoint_dir(run_dir))[-1], weights_only=True)
    own = {key.partition(".")[2]: tensor for key, tensor in checkpoint["client_states"].items()
           if key.startswith(f"client{client}.")}
    assert set(adapter) == {peft_name(key) for key in own}
    for key, tensor in own.items():
        assert torch.equal(adapter[peft_name(key)], tensor), key


def peft_name(key: str) -> str:
    """peft's adapter name of a client's tensor key: "lora/blocks.0.attn.proj/B", "extra/head.weight"."""
    kind, _, rest = key.partition("/")
    if kind == "extra":
        return f"base_model.model.{rest}"
    layer, factor = rest.rsplit("/", 1)
    return f"base_model.model.{layer}.lora_{factor}.weight"
