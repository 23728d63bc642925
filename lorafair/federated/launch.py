"""What keeps a job from hanging: the launch is checked against the settings before any process waits for peers
(no process outlives the one that started it either: `lorafair.processes`). Every collective's timeout lives in
the transport."""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from lorafair.errors import UserError


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

