"""`python -m tests.federated.rank_state ARGS`: the round loop of `lorafair fit ARGS` (no export), after which every
process writes what it holds to out_dir/state.rank<R>.pt: its frozen weights of the adapted layers and its global
LoRA pairs. Run under torchrun, it shows what each rank holds, which the run's files (rank 0's) do not."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from tests.helpers import parse_fit_args


def main(args: list[str]) -> None:
    cfg = parse_fit_args(args)
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    trainer.run()
    state = {"base": trainer.model.base_state(), "lora": trainer.global_state.lora}
    torch.save(state, Path(cfg.out_dir) / f"state.rank{trainer.rank}.pt")
    trainer.transport.close()


if __name__ == "__main__":
    main(sys.argv[1:])
