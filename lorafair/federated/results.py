"""What a run reports as it goes, all on rank 0: config.yaml and classes.json when it starts, results.json rewritten
after every round, TensorBoard scalars per round (the starting model's at step 0), and at the end the final result,
TensorBoard's hparams entry and the accuracy table; where clients keep factors of their own, the same for each
client's own model (`personalised`) beside the global model's."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric

from lorafair.config import FitConfig
from lorafair.data import Client
from lorafair.federated.run_folder import (
    CLASSES_NAME,
    CONFIG_NAME,
    PERSONALISED,
    accuracy_table,
    config_to_dict,
    flatten_config,
    results_path,
    score_scalars,
    tensorboard_scalars,
)
from lorafair.federated.state import ResumeState, RoundRecord
from lorafair.files import write_json, write_yaml


class RunResults:
    """The content of results.json, and where it goes: the run folder, Fabric's TensorBoard logger and console."""

    def __init__(self, out_dir: Path, fabric: Fabric, results: dict[str, Any]) -> None:
        self.out_dir, self.fabric, self.results = Path(out_dir), fabric, results

    @classmethod
    def of_run(cls, cfg: FitConfig, fabric: Fabric, method: str, domains: list[str],
               participants: Iterable[Client]) -> RunResults:
        """The results of a run that has done no round yet; `method` is the method or the bound it runs."""
        return cls(cfg.out_dir, fabric, {
            "method": method, "seed": cfg.seed, "config": config_to_dict(cfg), "domains": domains,
            "clients": [{"id": c.id, "domain": c.domain, "num_samples": c.num_samples} for c in participants],
            "rounds": [], "bad_updates_total": 0,
        })

    def write_settings(self, cfg: FitConfig, classes: list[str]) -> None:
        """config.yaml and classes.json, as a run starts (or resumes)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(self.out_dir / CONFIG_NAME, config_to_dict(cfg))
        write_json(self.out_dir / CLASSES_NAME, classes)

    def start(self, entry: dict[str, Any]) -> None:
        """The starting model's scores (round 0): TensorBoard at step 0 now, results.json with round 1."""
        self.results["start"] = {"round": 0, **entry}
        self.fabric.log_dict(score_scalars(entry), step=0)

    def resume(self, resumed: ResumeState) -> None:
        """Continue the results of the run a checkpoint was written by."""
        self.results["rounds"] = resumed.records
        if resumed.start is not None:
            self.results["start"] = resumed.start
        self.results["bad_updates_total"] = sum(len(r["bad_updates"]) for r in resumed.records)
        self.fabric.print(f"resuming after round {resumed.round} from {resumed.path}")

    def add(self, record: RoundRecord, last: bool) -> None:
        """A finished round: results.json (with the final result after the `last` round) and its TensorBoard
        scalars."""
        entry = record.to_dict()
        self.results["rounds"].append(entry)
        self.results["bad_updates_total"] += len(entry["bad_updates"])
        if last:
            self.results["final"] = final_accuracy(self.results)
            if "personalised" in entry:
                self.results["personalised"] = final_accuracy(self.results, PERSONALISED)
        write_json(results_path(self.out_dir), self.results)
        self.fabric.log_dict({**tensorboard_scalars(entry), "bad_updates_total": self.results["bad_updates_total"]},
                             step=record.round)

    def finish(self, whose: str, metric: str) -> None:
        """The final results.json, the hparams entry of TensorBoard and the table of `whose` model's `metric` (and of
        each client's own model, where clients keep factors of their own)."""
        self.results["final"] = final = final_accuracy(self.results)
        blocks = {"": ("", final)} if "accuracy" in final else {}
        if any(PERSONALISED in record for record in self.results["rounds"]):
            self.results[PERSONALISED] = final_accuracy(self.results, PERSONALISED)
            blocks[PERSONALISED] = (f"{PERSONALISED}_", self.results[PERSONALISED])
        write_json(results_path(self.out_dir), self.results)
        metrics = {f"hparams/{prefix}{key}": block[key] for prefix, block in blocks.values()
                   for key in ("mean_accuracy", "mean_eval_loss") if key in block}
        self.fabric.logger.log_hyperparams(flatten_config(self.results["config"]), metrics=metrics)
        self.fabric.logger.finalize("success")
        start = self.results.get("start", {}).get("accuracy")
        if "accuracy" not in final:
            self.fabric.print(f"{self.results['method']}: {whose}: {final['global_model']}")
        for name, (_, block) in blocks.items():
            model = "each client's own model on its own domain" if name else whose
            self.fabric.print(accuracy_table(block["accuracy"], block["mean_accuracy"],
                                             f"{self.results['method']}: {model} after round {block['round']}",
                                             block.get("eval_loss"), start, metric))


def final_accuracy(results: dict[str, Any], block: str | None = None) -> dict[str, Any]:
    """The last evaluated round's scores (and eval losses, where reported), with the gain over the starting model
    (round 0) where the run scored it: the run's result. block: PERSONALISED for each client's own model's scores
    of that round instead of the global model's. A round evaluated without global scores (`RoundRecord.global_model`)
    gives, for the global model, its round and why it has none."""
    last = next(record for record in reversed(results["rounds"]) if "accuracy" in record or "global_model" in record)
    if block is None and "accuracy" not in last:
        return {"round": last["round"], "global_model": last["global_model"]}
    scores = last if block is None else last[block]
    final = {"round": last["round"], **{key: scores[key] for key in ("accuracy", "mean_accuracy", "eval_loss",
                                                                     "mean_eval_loss", "correct_items")
                                        if key in scores}}
    start = results.get("start")
    if start is not None:
        final["gain"] = {domain: value - start["accuracy"][domain] for domain, value in final["accuracy"].items()}
        final["mean_gain"] = final["mean_accuracy"] - start["mean_accuracy"]
    return final
