"""Starting the processes of a job on Lightning Fabric (`launch_fabric`), and what keeps a job from hanging: the
launch is checked against the settings before any process waits for peers, no process outlives the one that
started it (`lorafair.processes`), and every collective times out (the transport)."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from lightning.fabric.strategies import DDPStrategy

from lorafair.config import FitConfig
from lorafair.errors import UserError
from lorafair.federated.run_folder import TENSORBOARD_NAME
from lorafair.processes import die_with_parent


def launched_processes(env: Mapping[str, str]) -> tuple[int, str]:
    """(processes this launch started, where that number comes from): torchrun's WORLD_SIZE, else SLURM's task count,
    else 1."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if env.get(name, "").isdigit():
            return int(env[name]), f"{name}={env[name]}"
    return 1, "no WORLD_SIZE from torchrun nor SLURM_NTASKS: a plain process"


def check_launch(num_nodes: int, env: Mapping[str, str], argv: list[str]) -> None:
    """Stop at once, with the command that would work, when the settings need more (or fewer) processes than the
    launch started: the process group would otherwise wait forever for ranks that never come."""
    per_node = int(env["LOCAL_WORLD_SIZE"]) if env.get("LOCAL_WORLD_SIZE", "").isdigit() else 1
    needed = num_nodes * per_node
    given, source = launched_processes(env)
    if needed == given:
        return
    rendezvous = "--standalone" if num_nodes == 1 else "--rdzv_backend c10d --rdzv_endpoint HOST_OF_NODE_0:29500"
    command = (f"torchrun --nnodes {num_nodes} --nproc_per_node {per_node} {rendezvous} -m lorafair "
               f"{shlex.join(argv)}")
    raise UserError(f"num_nodes: {num_nodes} node(s) x {per_node} process(es) per node need {needed} processes, but "
                    f"this launch started {given} ({source}); start it on every node with: {command}")


def launch_fabric(cfg: FitConfig, tensorboard: bool = True) -> Fabric:
    """One process per device under torchrun (gloo on CPU, NCCL on GPU), else a single process.

    bf16-mixed on CUDA and 32-true elsewhere unless `precision` says otherwise. TensorBoard goes to
    out_dir/tensorboard (Fabric writes it from rank 0 only); a process that only trains clients (a Flower node)
    passes tensorboard=False.
    The launch is checked against num_nodes first, and every collective times out after federation.timeout, so a
    missing or stuck rank is one line instead of a hang.
    """
    check_launch(cfg.num_nodes, os.environ, sys.argv[1:])
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    under_torchrun = "LOCAL_WORLD_SIZE" in os.environ
    timeout = timedelta(seconds=cfg.federation.timeout)
    if under_torchrun:
        die_with_parent()  # a killed torchrun agent takes its ranks with it
    on_cuda = cfg.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    if under_torchrun and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        join_restarted_process_group("nccl" if on_cuda else "gloo", timeout)
    precision = cfg.precision or ("bf16-mixed" if on_cuda else "32-true")
    logger = (TensorBoardLogger(root_dir=cfg.out_dir, name=TENSORBOARD_NAME, version="", default_hp_metric=False)
              if tensorboard else None)
    fabric = Fabric(accelerator=cfg.accelerator, strategy=DDPStrategy(timeout=timeout) if under_torchrun else "auto",
                    devices=int(os.environ["LOCAL_WORLD_SIZE"]) if under_torchrun else 1, num_nodes=cfg.num_nodes,
                    precision=precision, loggers=logger)
    fabric.launch()
    return fabric


def join_restarted_process_group(backend: str, timeout: timedelta) -> None:
    """Join the process group of a torchrun restart under a key prefix of its own (Fabric then reuses the group).

    torchrun keeps one key-value store for all attempts of a job; without the prefix, the ranks of a restarted
    attempt can read the connection addresses the killed attempt left there and fail to connect.
    """
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    dist.init_process_group(backend, store=dist.PrefixStore(f"lorafair/attempt_{attempt}", agent_store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
