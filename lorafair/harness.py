"""`lorafair lm_eval`: score a run's global language model with lm-evaluation-harness (`lm-eval`, text extra).

The model is rebuilt from the run folder's config.yaml and its newest checkpoint (`lorafair.export.global_model`:
the global LoRA factors, and the frozen weights FLoRA / FedEx-LoRA merged into), then handed to lm-eval as a
`transformers` model. Any lm-eval task runs where its data is reachable (MMLU, GSM8K, ...); `include_path` adds
task YAML files of your own, e.g. over a local JSONL file. Tasks that execute generated code run only with
`allow_code_execution`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lorafair.errors import UserError
from lorafair.export import global_model, open_run
from lorafair.files import write_json

CODE_EXECUTING_TASKS = ("humaneval", "mbpp", "ds1000", "apps")
"""lm-eval task name prefixes whose scoring runs the generated programs."""
RESULTS_NAME = "lm_eval.json"


def executes_code(task: str) -> bool:
    return task.lower().startswith(CODE_EXECUTING_TASKS)


def score(run_dir: Path, tasks: list[str], include_path: Path | None = None, batch_size: int = 8,
          limit: int | None = None, allow_code_execution: bool = False) -> dict[str, Any]:
    """lm-eval's results of the run's global model on `tasks`, also written to run_dir/lm_eval.json."""
    unsafe = [task for task in tasks if executes_code(task)]
    if unsafe and not allow_code_execution:
        raise UserError(f"--tasks: {', '.join(unsafe)} run the code the model writes; pass --allow_code_execution "
                        f"true to allow it (in a sandbox)")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise UserError("lm_eval: lm-evaluation-harness is not installed; pip install 'lorafair[text]'") from err
    run = open_run(run_dir)
    if not run.cfg.is_language_model or run.cfg.is_text_classifier:
        raise UserError(f"{run_dir}: lm-eval scores causal language models; this run trained a "
                        f"{run.cfg.data.name} model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = global_model(run).to(device)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    missing = [task for task in tasks if task not in manager.all_tasks]
    if missing:
        raise UserError(f"--tasks: lm-eval has no task {missing[0]!r}; add its YAML with --include_path DIR")
    lm = HFLM(pretrained=model.backbone, tokenizer=model.tokenizer, batch_size=batch_size, device=str(device))
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                          confirm_run_unsafe_code=allow_code_execution)
    results = json.loads(json.dumps(out["results"], default=float))
    write_json(run_dir / RESULTS_NAME, results)
    return results
