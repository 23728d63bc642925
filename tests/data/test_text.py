"""Text data: both file layouts read with datasets, the response-only loss mask, answer extraction, partitions by
task and category, bad input as one line with exit code 2, and a round's reads independent of unsampled clients."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafair.cli import main
from lorafair.config import ModelConfig
from lorafair.data.text import (
    IGNORE_INDEX,
    answers_from_codes,
    build_text_data,
    encode_instruction,
    encode_prompt,
    extract_answer,
    load_tokenizer,
)
from tests.helpers import DEMO_LM, TINY_LLAMA, parse_fit_args


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name=DEMO_LM))


def _chars(tokenizer, text: str) -> list[int]:
    """The character tokenizer's ids of `text`, looked up one character at a time (not through encode)."""
    return tokenizer.convert_tokens_to_ids(list(text))


def test_the_loss_covers_the_response_and_its_eos_only(tokenizer):
    prompt, response = "Add: 2 + 3\nA: ", "#### 5"
    inputs, labels = encode_instruction(tokenizer, prompt, response, max_length=32)
    prompt_ids = [tokenizer.bos_token_id, *_chars(tokenizer, prompt)]
    response_ids = [*_chars(tokenizer, response), tokenizer.eos_token_id]
    used = len(prompt_ids) + len(response_ids)
    assert inputs[0, :used].tolist() == prompt_ids + response_ids
    assert inputs[0, used:].eq(tokenizer.pad_token_id).all() and inputs[1].tolist() == [1] * used + [0] * (32 - used)
    assert labels.tolist() == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [IGNORE_INDEX] * (32 - used)


def test_a_too_long_example_loses_the_start_of_its_prompt_not_its_response(tokenizer):
    prompt, response = "Solve: " + "x" * 40 + "\nA: ", "#### 12"
    inputs, labels = encode_instruction(tokenizer, prompt, response, max_length=20)
    response_ids = [*_chars(tokenizer, response), tokenizer.eos_token_id]
    assert inputs[0].tolist()[-len(response_ids):] == response_ids and inputs[1].all()
    assert labels.tolist() == [IGNORE_INDEX] * (20 - len(response_ids)) + response_ids
    assert tokenizer.decode(inputs[0, :20 - len(response_ids)]) == prompt[-(20 - len(response_ids)):]


def test_test_prompts_are_left_padded_for_batched_generation(tokenizer):
    inputs = encode_prompt(tokenizer, "Add: 1 + 1\nA: ", max_length=24)
    ids = [tokenizer.bos_token_id, *_chars(tokenizer, "Add: 1 + 1\nA: ")]
    assert inputs[0].tolist() == [tokenizer.pad_token_id] * (24 - len(ids)) + ids
    assert inputs[1].tolist() == [0] * (24 - len(ids)) + [1] * len(ids)


@pytest.mark.parametrize(("text", "pattern", "answer"), [
    ("Natalia sold 48 clips.\n#### 72", r"####\s*(-?[\d,.]+)", "72"),
    ("so the total is\n#### 1,234.", r"####\s*(-?[\d,.]+)", "1234"),
    ("#### -5 apples", r"####\s*(-?[\d,.]+)", "-5"),
    ("no marker here: 42", r"####\s*(-?[\d,.]+)", None),
    ("The answer is (B).", r"answer is \(([A-E])\)", "B"),
    ("result 7 then 8", r"\d+", "7"),
    ("def f(x):\n    return x + 3", r"####\s*(-?[\d,.]+)|return (.+)", "x + 3"),
])
def test_the_final_answer_is_extracted_by_the_configured_rule(text, pattern, answer):
    assert extract_answer(text, pattern) == answer


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _write_table(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _glue_rows(tasks: list[str], per_task: int) -> list[list]:
    """(premise, hypothesis, label, task) rows: labels cycle through the three MNLI names."""
    names = ["entailment", "neutral", "contradiction"]
    return [[f"{task} premise {i}", f"hypothesis {i}", names[i % 3], task] for task in tasks for i in range(per_task)]


def test_glue_style_tsv_pairs_are_split_by_task(tmp_path, tokenizer):
    rows = _glue_rows(["mnli", "rte", "qnli"], 10)
    train = _write_table(tmp_path / "train.tsv", ["premise", "hypothesis", "label", "task"], rows, "\t")
    test = _write_table(tmp_path / "test.tsv", ["premise", "hypothesis", "label", "task"], rows[::5], "\t")
    cfg = parse_fit_args(["--data.name", "text_classification", *TINY_LLAMA, "--text.train_files", f"[{train}]",
                          "--text.test_files", f"[{test}]", "--text.text_columns", "[premise, hypothesis]",
                          "--text.domain_column", "task", "--text.max_length", "40"])
    data = build_text_data(cfg, tokenizer)
    assert data.classes == ["contradiction", "entailment", "neutral"]
    assert data.domains == ["mnli", "rte", "qnli"] and [c.domain for c in data.clients] == data.domains
    assert [c.num_samples for c in data.clients] == [10, 10, 10]
    assert [c.class_counts for c in data.clients] == [[3, 4, 3]] * 3  # labels 0..9 cycle entailment, neutral, ...
    assert {name: len(test) for name, test in data.test.items()} == {"mnli": 2, "rte": 2, "qnli": 2}
    inputs, label = data.clients[1].dataset[4]
    assert tokenizer.decode(inputs[0][inputs[1].bool()], skip_special_tokens=True) == "rte premise 4hypothesis 4"
    assert data.classes[label] == "neutral"


def test_csv_and_jsonl_classification_with_a_label_skew_partition(tmp_path, tokenizer):
    rows = [[f"sentence {i}", i % 2] for i in range(60)]
    train_csv = _write_table(tmp_path / "sst2.csv", ["sentence", "label"], rows)
    train_jsonl = _write_jsonl(tmp_path / "sst2.jsonl", [{"sentence": s, "label": y} for s, y in rows])
    for train in (train_csv, train_jsonl):
        cfg = parse_fit_args(["--data.name", "text_classification", *TINY_LLAMA, "--text.train_files", f"[{train}]",
                              "--text.text_columns", "[sentence]", "--federation.partition", "feature_label",
                              "--federation.clients_per_domain", "3", "--federation.min_client_samples", "2",
                              "--data.test_fraction", "0.2"])
        data = build_text_data(cfg, tokenizer)
        assert data.classes == ["0", "1"] and data.domains == ["all"] and len(data.clients) == 3
        assert sum(c.num_samples for c in data.clients) == 48 and len(data.test["all"]) == 12
        held = [tuple(c.class_counts) for c in data.clients]
        held_out = [int((data.test["all"].labels == label).sum()) for label in (0, 1)]
        assert [sum(column) for column in zip(*held, strict=True)] == [30 - n for n in held_out]  # each row once


def test_instruction_jsonl_in_the_alpaca_layout_split_by_category(tmp_path, tokenizer):
    records = [{"instruction": f"Task {i}", "input": "" if i % 2 else f"context {i}", "output": f"#### {i}",
                "category": ["qa", "summary", "brainstorm"][i % 3]} for i in range(90)]
    train = _write_jsonl(tmp_path / "dolly.jsonl", records)
    cfg = parse_fit_args(["--data.name", "instruction", *TINY_LLAMA, "--text.train_files", f"[{train}]",
                          "--text.category_column", "category", "--federation.partition", "feature_label",
                          "--federation.clients_per_domain", "4", "--federation.dirichlet_alpha", "0.1",
                          "--federation.min_client_samples", "2", "--text.prompt_template",
                          "{instruction}|{input}|", "--text.max_length", "40"])
    data = build_text_data(cfg, tokenizer)
    assert data.classes == ["brainstorm", "qa", "summary"] and len(data.clients) == 4
    test = data.test["all"]
    assert len(test) == 18
    prompts = {test.rows.examples[i][0]: test.rows.examples[i][2] for i in range(len(test))}
    assert all(prompt.count("|") == 2 and prompt.startswith("Task ") for prompt in prompts)
    first = next(iter(prompts))
    number = first.split("|")[0].split()[1]
    assert prompts[first] == number and (first.split("|")[1] == "") == (int(number) % 2 == 1)
    inputs, codes = test[0]
    assert answers_from_codes(codes[None]) == [test.rows.examples[0][2]]
    assert tokenizer.decode(inputs[0][inputs[1].bool()], skip_special_tokens=True) == test.rows.examples[0][0]


def test_gsm8k_and_code_instruction_files_read_with_the_paper_config(tmp_path, tokenizer):
    gsm = [{"instruction": f"Ann has {i} pens and buys 2. How many?", "output": f"{i} + 2 = {i + 2}\n#### {i + 2}",
            "task": "gsm8k"} for i in range(12)]
    code = [{"instruction": "Write a function.", "input": f"add {i}", "output": f"def f(x):\n    return x + {i}",
             "task": "code"} for i in range(12)]
    train = _write_jsonl(tmp_path / "train.jsonl", gsm + code)
    cfg = parse_fit_args(["--config", "llama_math_code", *TINY_LLAMA, "--model.pretrained", "false",
                          "--text.train_files", f"[{train}]", "--text.test_files", "[]"])
    data = build_text_data(cfg, tokenizer)
    assert data.domains == ["gsm8k", "code"] and [c.num_samples for c in data.clients] == [10, 10]
    _, labels = data.clients[0].dataset[0]
    response = tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True)
    assert response.startswith(tuple(f"{i} + 2 = " for i in range(12))) and "####" in response
    answers = {domain: [example[2] for example in test.rows.examples] for domain, test in data.test.items()}
    held_out = {r["output"]: r for r in gsm + code}
    assert all(answer.isdigit() for answer in answers["gsm8k"])  # the number after ####
    assert all(answer in held_out and answer.startswith("def f(x)") for answer in answers["code"])  # the whole output
    assert [t.rows.examples[0][0].startswith("Below is an instruction") for t in data.test.values()] == [True, True]


def _bad_files(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad input: (the fit arguments, the start of the one error line)."""
    good = [{"instruction": "Add:", "input": "1 + 1", "output": "#### 2"}] * 3
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[0]) + "\n{oops\n")
    no_output = _write_jsonl(tmp_path / "no_output.jsonl", [{"instruction": "x", "response": "y"}])
    (tmp_path / "empty.jsonl").write_text("")
    fine = _write_jsonl(tmp_path / "fine.jsonl", good)
    labels = _write_table(tmp_path / "labels.csv", ["text", "label"], [["a", "pos"], ["b", "neg"], ["c", "meh"]])
    no_answer = _write_jsonl(tmp_path / "no_answer.jsonl", [*good, {"instruction": "x", "input": "", "output": "y"}])
    latin1 = tmp_path / "latin1.jsonl"  # "café" written as Latin-1 on line 2
    latin1.write_bytes((json.dumps(good[0]) + "\n" + json.dumps(good[0]).replace("Add", "caf\u00e9") + "\n"
                        ).encode("latin-1"))
    latin1_tsv = tmp_path / "latin1.tsv"
    latin1_tsv.write_bytes("sentence\tlabel\nfine\t0\nna\u00efve\t1\n".encode("latin-1"))
    instruction = ["--data.name", "instruction", "--text.train_files"]
    return {
        "not UTF-8 jsonl": ([*instruction, f"[{latin1}]"],
                            f"{latin1}, line 2: not UTF-8 text (byte 0xe9 at byte 21 of the line); save the file as "
                            "UTF-8"),
        "not UTF-8 tsv": (["--data.name", "text_classification", "--text.train_files", f"[{latin1_tsv}]"],
                          f"{latin1_tsv}, line 3: not UTF-8 text (byte 0xef at byte 3 of the line)"),
        "not json": ([*instruction, f"[{not_json}]"], f"{not_json}, line 3: not valid JSON"),
        "missing column": ([*instruction, f"[{no_output}]"], f"{no_output}: no column 'output'"),
        "empty file": ([*instruction, f"[{tmp_path / 'empty.jsonl'}]"], f"{tmp_path / 'empty.jsonl'}: the file is "
                                                                         "empty"),
        "label outside the classes": (["--data.name", "text_classification", "--text.train_files", f"[{labels}]",
                                       "--text.classes", "[neg, pos]"], f"{labels}, line 4: label 'meh' is not one"),
        "no final answer": ([*instruction, f"[{no_answer}]"], f"{no_answer}, line 4: the output has no final answer"),
        "4-bit without CUDA": ([*instruction, f"[{fine}]", "--model.load_in_4bit", "true"],
                               "model.load_in_4bit: 4-bit weights (bitsandbytes) need a CUDA GPU"),
    }


@pytest.mark.parametrize("problem", ["not json", "not UTF-8 jsonl", "not UTF-8 tsv", "missing column", "empty file",
                                     "label outside the classes",
                                     "no final answer", "4-bit without CUDA"])
def test_bad_text_input_is_one_line_naming_file_and_line_exit_2(tmp_path, capsys, problem):
    if problem == "4-bit without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 4-bit loading is allowed here")
    args, message = _bad_files(tmp_path)[problem]
    assert main(["fit", *TINY_LLAMA, *args, "--out_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorafair: error: {message}") and err.count("\n") == 1 and "Traceback" not in err


def test_text_data_with_an_image_model_family_is_refused(capsys, tmp_path):
    assert main(["fit", "--data.name", "arithmetic", "--model.family", "timm", "--out_dir", str(tmp_path)]) == 2
    assert "model.family: timm cannot read data.name arithmetic" in capsys.readouterr().err
    assert main(["fit", "--config", "demo_text", "--data.domains", "[garden, division]"]) == 2
    assert "data.domains: arithmetic has no kind 'division'; choose from word_problem," in capsys.readouterr().err
    assert main(["fit", "--config", "demo_text", "--model.load_in_4bit", "true", "--server.method", "flora"]) == 2
    assert "model.load_in_4bit: flora merges LoRA products into the frozen weights" in capsys.readouterr().err


def test_the_image_path_never_imports_the_text_extra(tmp_path):
    """`lorafair data` on the image demo with datasets and lm_eval made unimportable."""
    blocker = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('datasets', 'lm_eval'):\n"
               "            raise ImportError('blocked: ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "from lorafair.cli import main\n"
               "code = main(['data', '--config', 'demo_digits'])\n"
               "text = ('lorafair.data.text', 'lorafair.data.arithmetic', 'lorafair.models.text')\n"
               "assert not any(m in text for m in sys.modules), 'text modules imported'\n"
               "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "digits: 6 domains" in done.stdout
