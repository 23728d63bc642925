"""lm-evaluation-harness on a run's global model, offline: a custom task over a local generated file."""

from __future__ import annotations

import json

import pytest

from lorafair.cli import main
from lorafair.data.arithmetic import problems
from lorafair.export import global_model, open_run
from lorafair.fit import fit
from tests.helpers import parse_fit_args

pytest.importorskip("lm_eval", reason="lm-eval is part of the text extra")

TASK = """task: sums_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{input}}}}\\nA: "
doc_to_target: "{{{{output}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_scores_the_global_model_on_a_local_task(tmp_path, capsys):
    run = tmp_path / "run"
    fit(parse_fit_args(["--config", "demo_text", "--text.examples_per_kind", "8", "--text.test_per_kind", "4",
                        "--federation.rounds", "1", "--client.max_local_steps", "1", "--server.method", "flora",
                        "--out_dir", str(run)]))
    _, test = problems("garden", 0, 12, seed=7)
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in test))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sums.yaml").write_text(TASK.format(path=data))

    assert main(["lm_eval", "--run", str(run), "--tasks", "sums_local", "--include_path", str(tasks),
                 "--batch_size", "4"]) == 0
    scored = json.loads((run / "lm_eval.json").read_text())["sums_local"]
    assert scored["sample_len"] == 12 and "sums_local: " in capsys.readouterr().out
    model = global_model(open_run(run))  # the run's model after its merge, generating on its own
    tokenizer, correct = model.tokenizer, 0
    for row in test:
        prompt = tokenizer(f"{row['input']}\nA: ", return_tensors="pt")
        out = model.backbone.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
        correct += text.split("\n")[0] == row["output"]
    assert scored["exact_match,none"] == pytest.approx(correct / len(test))


def test_tasks_that_run_generated_code_need_the_opt_in(tmp_path, capsys):
    assert main(["lm_eval", "--run", str(tmp_path), "--tasks", "humaneval", "gsm8k"]) == 2
    err = capsys.readouterr().err
    assert "--tasks: humaneval run the code the model writes; pass --allow_code_execution true" in err
