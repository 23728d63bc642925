"""`lorafair lm_eval`."""

from __future__ import annotations

from pathlib import Path


def lm_eval(*, run: Path, tasks: list[str], include_path: Path | None = None, batch_size: int = 8,
            limit: int | None = None, allow_code_execution: bool = False) -> None:
    """Score a run's global language model with lm-evaluation-harness (lm-eval, in the text extra).

    Args:
        run: A run folder of a causal language model (its newest checkpoint is used).
        tasks: lm-eval task names, e.g. --tasks gsm8k mmlu, or tasks defined under --include_path.
        include_path: A folder of lm-eval task YAML files of your own (e.g. over a local JSONL file).
        batch_size: Examples per forward pass.
        limit: Score at most this many examples per task.
        allow_code_execution: Allow tasks that run the code the model writes (HumanEval, MBPP); off by default.
    """
    from lorafair.harness import score

    results = score(run, tasks, include_path, batch_size, limit, allow_code_execution)
    for task, metrics in results.items():
        shown = ", ".join(f"{name}: {value:.4f}" for name, value in metrics.items() if isinstance(value, float))
        print(f"{task}: {shown}")
