"""Language models after fit: the eval loss of instruction data against a plain loop over single examples, and the
export loaded with transformers and peft alone (the merged model and base + adapter give the run's logits and its
greedy generations), for a causal LM and a sequence classifier."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafair.cli import main
from lorafair.data.build import build_data
from lorafair.data.text import IGNORE_INDEX
from lorafair.export import global_model, open_run
from lorafair.federated.run_folder import accuracy_table
from lorafair.fit import fit
from tests.helpers import REDUCED_DEMO, ROOT, glue_file, parse_fit_args

pytestmark = pytest.mark.xdist_group("test_export_text")
"""One pytest-xdist worker runs this module, so its module fixtures (runs of fit) are built once."""


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> tuple[Path, dict]:
    """The reduced text demo with FedEx-LoRA: both the frozen weights (merged residuals) and the adapter move."""
    out = tmp_path_factory.mktemp("lm_run")
    return out, fit(parse_fit_args([*REDUCED_DEMO, "--server.method", "fedex_lora", "--out_dir", str(out)]))


def _plain_loss(backbone, tokenizer, prompt: str, response: str, prompt_counts: bool) -> tuple[float, int]:
    """(summed loss, terms) of one unpadded example from transformers' own loss: the characters looked up one by one,
    labels -100 on the prompt (or on the first token only, when the prompt counts)."""
    prompt_ids = [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(list(prompt))]
    response_ids = [*tokenizer.convert_tokens_to_ids(list(response)), tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + response_ids])
    labels = ids.clone()
    labels[0, :1 if prompt_counts else len(prompt_ids)] = IGNORE_INDEX
    terms = int((labels[0, 1:] != IGNORE_INDEX).sum())
    return backbone(input_ids=ids, labels=labels).loss.item() * terms, terms


def test_the_eval_loss_is_the_mean_cross_entropy_of_the_test_responses(lm_run):
    run_dir, results = lm_run
    final = results["final"]
    assert set(final["eval_loss"]) == set(results["domains"])
    assert results["rounds"][0]["eval_loss"] != results["rounds"][1]["eval_loss"]
    assert final["eval_loss"] == results["rounds"][-1]["eval_loss"]
    run = open_run(run_dir)
    model = global_model(run)
    data = build_data(run.cfg)
    for domain in data.domains:
        examples = data.test[domain].rows.examples
        assert all(len(prompt) + len(response) + 2 <= run.cfg.text.max_length for prompt, response, _ in examples)
        with torch.no_grad():
            response_only = [_plain_loss(model.backbone, model.tokenizer, p, r, False) for p, r, _ in examples]
            everything = [_plain_loss(model.backbone, model.tokenizer, p, r, True) for p, r, _ in examples]
        expected = sum(loss for loss, _ in response_only) / sum(terms for _, terms in response_only)
        assert final["eval_loss"][domain] == pytest.approx(expected, rel=1e-5)
        with_prompt = sum(loss for loss, _ in everything) / sum(terms for _, terms in everything)
        assert abs(with_prompt - expected) > 1e-2 * expected  # the prompt's tokens would change it
    assert final["mean_eval_loss"] == pytest.approx(sum(final["eval_loss"].values()) / len(data.domains))


def test_the_eval_loss_reaches_tensorboard_the_model_card_and_the_printed_table(lm_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    table = accuracy_table({"addition": 0.5, "number_words": 0.25}, 0.375, "title", {"addition": 0.5,
                                                                                      "number_words": 2.0})
    assert table.splitlines()[1].split() == ["domain", "top-1", "%", "eval", "loss"]
    assert table.splitlines()[-1].split() == ["mean", "37.50", "1.2500"]
    run_dir, results = lm_run
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    scalars = events.Tags()["scalars"]
    assert "eval_loss/mean" in scalars and "eval_loss/garden" in scalars
    assert events.Scalars("eval_loss/garden")[-1].value == pytest.approx(results["final"]["eval_loss"]["garden"])
    card = (run_dir / "final" / "README.md").read_text()
    assert "eval loss" in card and "Exact match of the global model after round" in card
    assert "| domain | exact match % | eval loss |" in card


# ---- the export ---------------------------------------------------------------------------------------------------


def _plain_models(folder: Path, auto):
    """The merged model and base + adapter, loaded with transformers and peft alone."""
    from peft import PeftModel

    merged = auto.from_pretrained(str(folder)).eval()
    adapted = PeftModel.from_pretrained(auto.from_pretrained(str(folder / "base")), str(folder / "adapter")).eval()
    return merged, adapted


def test_the_exported_causal_lm_loads_with_transformers_and_peft_alone(lm_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = lm_run
    folder = run_dir / "final"
    merged, adapted = _plain_models(folder, AutoModelForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    inputs = tokenizer(["87+91\nA: ", "Ann has 12 pens and gets 7 more. How many?\nA: ", "forty-two plus seven\nA: "],
                       return_tensors="pt", padding=True)
    model = global_model(open_run(run_dir))
    untouched = AutoModelForCausalLM.from_pretrained(str(folder / "base")).eval()
    with torch.no_grad():
        reference = model.backbone(**inputs).logits
        assert (untouched(**inputs).logits - reference).abs().max() > 1e-3  # the adapter matters
        assert torch.allclose(adapted(**inputs).logits, reference, atol=1e-5)
        assert torch.allclose(merged(**inputs).logits, reference, atol=1e-4)
        settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        generated = model.backbone.generate(**inputs, **settings)
        assert torch.equal(merged.generate(**inputs, **settings), generated)
        assert torch.equal(adapted.generate(**inputs, **settings), generated)
    original = AutoModelForCausalLM.from_pretrained("lorafair/assets/demo_text_lm").state_dict()
    base = untouched.state_dict()
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[q_proj], original[q_proj])  # FedEx-LoRA's merges are in base/
    assert torch.equal(base["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def test_the_exported_classifier_keeps_its_head_as_modules_to_save(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train = glue_file(tmp_path / "train.tsv", 40)
    fit(parse_fit_args([
        "--data.name", "text_classification", "--model.name", "roberta", "--model.tokenizer",
        "lorafair/assets/demo_text_lm", "--model.kwargs", "{hidden_size: 16, intermediate_size: 32, "
        "num_hidden_layers: 1, num_attention_heads: 2, max_position_embeddings: 80}", "--text.train_files",
        f"[{train}]", "--text.text_columns", "[sentence]", "--text.domain_column", "task", "--text.max_length", "24",
        "--federation.rounds", "1", "--client.max_local_steps", "3", "--client.lr", "0.5", "--data.batch_size", "4",
        "--data.num_workers", "0", "--lora.r", "2", "--server.method", "fedit", "--out_dir", str(tmp_path / "run")]))
    folder = tmp_path / "run" / "final"
    assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    merged, adapted = _plain_models(folder, AutoModelForSequenceClassification)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    inputs = tokenizer(["good film 3", "bad film 12"], return_tensors="pt", padding=True)
    model = global_model(open_run(tmp_path / "run"))
    start = AutoModelForSequenceClassification.from_pretrained(str(folder / "base")).eval()
    with torch.no_grad():
        reference = model.backbone(**inputs).logits
        assert torch.allclose(adapted(**inputs).logits, reference, atol=1e-5)
        assert torch.allclose(merged(**inputs).logits, reference, atol=1e-5)
    trained_head = model.get_extra()["classifier.out_proj.weight"]
    assert torch.equal(start.state_dict()["classifier.out_proj.weight"], trained_head)


def test_the_readme_snippet_generates_what_the_run_generates(lm_run, tmp_path):
    """The transformers snippet of docs/language-models.md, run as written (no lorafair import) in a folder holding
    runs/demo_text."""
    run_dir, _ = lm_run
    text = (ROOT / "docs" / "language-models.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Exporting a language model"):], re.DOTALL).group(1)
    assert "lorafair" not in code.replace("runs/demo_text", "")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo_text").symlink_to(run_dir)
    printed = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, capture_output=True,
                             text=True).stdout
    model = global_model(open_run(run_dir))
    tokenizer = model.tokenizer
    prompts = ["Ann has 35 pens and gets 27 more. How many?\nA: ", "A baker made 71 buns and sold 12. Left?\nA: "]
    expected = []
    for prompt in prompts:  # one at a time, unpadded
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.backbone.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert ast.literal_eval(printed.strip().splitlines()[-1]) == expected


def test_evaluate_refuses_a_language_model_in_one_line(lm_run, capsys):
    run_dir, _ = lm_run
    for source in (run_dir, run_dir / "final"):
        assert main(["evaluate", "--run", str(source)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "lm_eval" in err and "results.json" in err
