"""No hang from a bad launch or a stuck peer, and no process outlives a killed job. Every subprocess has a timeout,
so a regression fails instead of hanging the suite. And the launch's CPU threads."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorafair.config import FitConfig
from lorafair.errors import UserError
from lorafair.federated.checkpoints import (
    list_checkpoints,
    load_checkpoint,
)
from lorafair.federated.launch import check_launch, launch_fabric
from lorafair.fit import fit
from tests.helpers import SEVERAL_PROCESSES, free_port, python_environment, tiny_args, tiny_config, two_rank_command

pytestmark = SEVERAL_PROCESSES


def test_more_nodes_than_processes_outside_torchrun_stops_at_once(tmp_path):
    started = time.monotonic()
    env = {k: v for k, v in python_environment().items() if k not in ("WORLD_SIZE", "SLURM_NTASKS")}
    done = subprocess.run([sys.executable, "-m", "lorafair", "fit", *tiny_args(tmp_path), "--num_nodes", "2"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "num_nodes: 2 node(s) x 1 process(es) per node need 2 processes, but this launch started 1" in done.stderr
    assert "torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d" in done.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(("num_nodes", "env", "message"), [
    (2, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "need 4 processes, but this launch started 2 (WORLD_SIZE=2)"),
    (1, {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "need 2 processes, but this launch started 4"),
    (3, {"SLURM_NTASKS": "2"}, "need 3 processes, but this launch started 2 (SLURM_NTASKS=2)"),
])
def test_the_launch_check_counts_processes_from_the_environment(num_nodes, env, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_launch(num_nodes, env, ["fit"])
    check_launch(2, {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, ["fit"])  # 2 nodes x 2: fits
    check_launch(1, {}, ["fit"])


def _start_ranks(out_dir: Path, *extra: str, **env: str) -> list[subprocess.Popen]:
    """Two ranks started by hand with the environment torchrun gives its workers (no agent, so no agent's grace
    period for a rank that does not stop); each writes its output beside out_dir, to <out_dir>.rank<R>.log (the
    run folder holds only what lorafair writes)."""
    shared = {**python_environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
              "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "by-hand", **env}
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = []
    for rank in (0, 1):
        with out_dir.with_name(f"{out_dir.name}.rank{rank}.log").open("w") as log:
            ranks.append(subprocess.Popen([sys.executable, "-m", "lorafair", "fit", *tiny_args(out_dir, *extra)],
                                          stdout=log, stderr=subprocess.STDOUT,
                                          env={**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    return ranks


@pytest.mark.slow
def test_a_stopped_rank_makes_the_other_exit_naming_rank_and_round_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    ranks = _start_ranks(run, "--federation.timeout", "5", LORAFAIR_FAIL_AT="2:train:1",
                         LORAFAIR_FAIL_SIGNAL="SIGSTOP")
    try:
        assert ranks[0].wait(timeout=240) == 2  # rank 1 is frozen in round 2: rank 0 gives up after 5 s
        assert ranks[1].poll() is None  # still there, stopped: nothing but the timeout ended rank 0
    finally:
        for rank in ranks:
            with contextlib.suppress(ProcessLookupError):
                rank.kill()
            rank.wait(timeout=30)
    output = run.with_name("run.rank0.log").read_text()
    lines = [line for line in output.splitlines() if line.startswith("lorafair: error:")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    assert lines[0].startswith("lorafair: error: round 2: rank 0 of 2 lost contact with the other ranks")
    assert "the checkpoint of round 1 is kept" in lines[0]
    assert [path.name for path in list_checkpoints(run / "checkpoints")] == ["round_00001.ckpt"]
    assert load_checkpoint(run / "checkpoints" / "round_00001.ckpt")["round"] == 1

    resumed = fit(tiny_config(run))  # the same command (resume auto), here in one process
    assert [record["round"] for record in resumed["rounds"]] == [1, 2] and resumed["final"]["round"] == 2


def _children() -> dict[int, list[int]]:
    """{parent pid: [child pids]} of every live (not zombie) process, read from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.slow
def test_no_rank_or_loader_worker_outlives_a_killed_torchrun_agent(tmp_path):
    args = tiny_args(tmp_path, "--federation.rounds", "200", "--data.num_workers", "1")
    job = subprocess.Popen(two_rank_command(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=python_environment())
    try:
        deadline, seen = time.monotonic() + 120, set()
        while time.monotonic() < deadline:
            seen |= _descendants(job.pid)
            ranks = set(_children().get(job.pid, []))
            workers = {child for rank in ranks for child in _children().get(rank, [])}
            if len(ranks) == 2 and workers:
                break
            time.sleep(0.2)
        assert len(ranks) == 2 and workers, "the ranks and their loader workers never all ran"
        watched = ranks | workers
        job.kill()
        job.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and watched & _alive():
            time.sleep(0.2)
        assert not watched & _alive()
    finally:
        for pid in _descendants(job.pid) | (seen & _alive()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive() -> set[int]:
    return {pid for children in _children().values() for pid in children}


def test_cpu_threads_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        launch_fabric(FitConfig(out_dir=tmp_path, cpu_threads=before + 1))
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
