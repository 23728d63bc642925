"""Flower's deployment engine on this machine: a SuperLink and three SuperNodes as separate processes on 127.0.0.1,
and `flwr run` of the packaged app (flower-app/), against `lorafair fit` with the same config and seed.

FLoRA with 2 of 3 clients per round: client 0 sits out round 1, so its node must catch up with round 1's merge
across separate ClientApp processes (Flower starts one per message; the node state carries the frozen weights).
Client 2 fails mid-round 2; the round goes on with client 0 alone. The reference is `fit` with client 2's update
poisoned in round 2, which fit drops. Every process started here, and every process those start, is killed at the end,
pass or fail; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lorafair.cli import main
from tests.helpers import ROOT, SEVERAL_PROCESSES, TINY_ARGS, free_ports

pytestmark = [pytest.mark.slow, SEVERAL_PROCESSES]

BIN = Path(sys.executable).parent


RUN_TIMEOUT = 600
"""Seconds `flwr run` may take (a few dozen on a quiet machine: Flower starts a process per message)."""


JOB = [*TINY_ARGS, "--data.domains", "[plain,inverted,rotated]", "--federation.clients_per_round", "2",
       "--server.method", "flora", "--cpu_threads", "1"]


FAILING = "2:2"
"""Round 2, client 2 (seed 0 samples clients 1, 2 in round 1 and 0, 2 in round 2)."""


def stop(process: subprocess.Popen) -> None:
    """Kill the process and everything it started (Flower's executors, ServerApp and ClientApps; some run in
    process groups of their own): SIGTERM, then SIGKILL to whatever is left after 5 s."""
    try:
        family = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=5)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    process.wait(timeout=5)


@pytest.fixture
def federation(tmp_path):
    """A SuperLink and three SuperNodes (partition-id 0..2) on free localhost ports; yields the env for `flwr run`."""
    link, *nodes = free_ports(4)
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "LORAFAIR_CLIENT_ERROR": FAILING}
    commands = [[str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                 "--disable-runtime-dependency-installation"]]
    commands += [[str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--host", "127.0.0.1", "--port", str(port), "--max-wait-time", "120",
                  "--node-config", f"partition-id={index} num-partitions=3"] for index, port in enumerate(nodes)]
    processes = []
    try:
        for index, command in enumerate(commands):
            log = open(tmp_path / f"process_{index}.log", "w")  # noqa: SIM115 (closed with the process)
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        yield env
    finally:
        for process in reversed(processes):
            stop(process)


def test_flower_deployment_equals_fit(tmp_path, monkeypatch, federation):
    monkeypatch.setenv("LORAFAIR_POISON", FAILING)
    assert main(["fit", *JOB, "--out_dir", str(tmp_path / "fit")]) == 0
    run_config = tmp_path / "run.toml"
    args = shlex.join([*JOB, "--out_dir", str(tmp_path / "flower")])
    run_config.write_text(f'config = ""\nargs = {json.dumps(args)}\ntimeout = {RUN_TIMEOUT}\n')
    start = time.monotonic()
    run = subprocess.run([str(BIN / "flwr"), "run", str(ROOT / "flower-app"), "local", "--run-config",
                          str(run_config), "--stream"], cwd=ROOT, env=federation, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT + 60)
    print(f"flwr run: {time.monotonic() - start:.0f} s\n{run.stdout[-3000:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    fit, flower = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("fit", "flower"))

    assert [r["clients"] for r in flower["rounds"]] == [r["clients"] for r in fit["rounds"]] == [[1, 2], [0, 2]]
    assert flower["rounds"][1]["failed_clients"].keys() == {"2"}
    assert "client 2 fails in round 2" in flower["rounds"][1]["failed_clients"]["2"]
    assert flower["rounds"][0]["failed_clients"] == {} and fit["rounds"][1]["bad_updates"].keys() == {"2"}
    for ours, reference in zip(flower["rounds"], fit["rounds"], strict=True):
        assert ours["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-12)
        assert ours["train_loss"] == pytest.approx({client: loss for client, loss in reference["train_loss"].items()
                                                    if client not in reference["bad_updates"]}, rel=1e-6)
    assert flower["final"]["mean_accuracy"] == pytest.approx(fit["final"]["mean_accuracy"], abs=1e-12)
    assert list((tmp_path / "flower" / "checkpoints").glob("round_*.ckpt"))
