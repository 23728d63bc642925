"""Time of one round of every method against FedIT's, on a shipped demo's job, measured in the same run.

    python benchmarks/round_time.py                      # the image demo (configs/demo.yaml), every method
    python benchmarks/round_time.py --config configs/demo_text.yaml --out benchmarks/results/round_time_text.json

Each method runs round 1 of the config's job in this process, with the config's CPU threads: every sampled client's
local training and the aggregation (`FederatedTrainer.run_round`; the job is set to two rounds and to evaluate at
round 2, so round 1 scores nothing). FedIT runs first and again last; every ratio is against the mean of its two
times, and the gap between those two shows how much the machine's speed drifted over the run. Building the trainer
(data, model, and a method's own start: FRLoRA's SVD of the frozen weights, Fed-SB's gradient exchange) is timed
apart as `setup_seconds`. Bytes up and down per client are those the round records in results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorafair.aggregation.registry import BUILT_IN
from lorafair.config import FitConfig
from lorafair.config_parse import parse_fit_config
from lorafair.errors import UserError
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer


def round_config(config: str, method: str, out_dir: Path) -> FitConfig:
    """The config's job under `method`, two rounds, evaluated at round 2 only, written to `out_dir`."""
    return parse_fit_config(["--config", config, "--server.method", method, "--out_dir", str(out_dir),
                             "--federation.rounds", "2", "--federation.eval_every", "2", "--export", "false"])


def time_round(cfg: FitConfig) -> dict[str, float | int]:
    """Seconds to build the trainer and to run round 1 of `cfg` (its train and aggregate parts), and the round's
    bytes per client."""
    start = time.perf_counter()
    trainer = FederatedTrainer(cfg, launch_fabric(cfg, tensorboard=False))
    trainer.start_or_resume()
    built = time.perf_counter()
    record = trainer.run_round(1)
    trainer.transport.close()
    return {"setup_seconds": round(built - start, 2), "round_seconds": round(record.seconds["round"], 2),
            "train_seconds": round(record.seconds["train"], 2),
            "aggregate_seconds": round(record.seconds["aggregate"], 3),
            "bytes_up": record.server.bytes_up, "bytes_down": record.server.bytes_down}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--methods", default=",".join(method.name for method in BUILT_IN),
                        help="comma-separated; fedit is always timed first and last")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    methods = [method for method in args.methods.split(",") if method != "fedit"]
    rows: dict[str, dict[str, float | int]] = {}
    with tempfile.TemporaryDirectory() as folder:
        try:  # every config checked before the first run is timed
            configs = [round_config(args.config, method, Path(folder) / f"{index}-{method}")
                       for index, method in enumerate(["fedit", *methods, "fedit"])]
        except UserError as err:
            parser.exit(2, f"round_time: {err}\n")
        for index, cfg in enumerate(configs):
            method = cfg.server.method
            row = time_round(cfg)
            key = "fedit (last)" if method == "fedit" and index > 0 else method
            rows[key] = row
            print(f"{key:14s} round {row['round_seconds']:7.2f} s (train {row['train_seconds']:.2f} s, aggregate "
                  f"{row['aggregate_seconds']:.3f} s), setup {row['setup_seconds']:.2f} s, bytes up "
                  f"{row['bytes_up']:,} down {row['bytes_down']:,}", flush=True)
    reference = (rows["fedit"]["round_seconds"] + rows["fedit (last)"]["round_seconds"]) / 2
    for row in rows.values():
        row["round_vs_fedit"] = round(row["round_seconds"] / reference, 3)
    result = {"config": args.config, "torch": torch.__version__, "machine": platform.machine(),
              "fedit_round_seconds": round(reference, 2), "methods": rows}
    print(json.dumps({name: row["round_vs_fedit"] for name, row in rows.items()}, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # nothing to keep: the runs live in a temporary folder
        print("round_time: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
