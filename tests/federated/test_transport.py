"""Two gloo ranks on the CPU: the collectives of the transport, torchrun against one process, elastic restarts; and
the flat buffers the collectives send."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lorafair.federated import transport as comm
from lorafair.federated.checkpoints import (
    load_checkpoint,
)
from lorafair.federated.transport import flatten, unflatten
from tests.helpers import (
    ROOT,
    SEVERAL_PROCESSES,
    free_port,
    python_environment,
    run_on_two_ranks,
    tiny_args,
    tiny_config,
)

pytestmark = SEVERAL_PROCESSES


def _collectives(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        assert comm.all_gather_objects({"rank": rank, "reports": [rank] * (rank + 1)}) == [
            {"rank": 0, "reports": [0]}, {"rank": 1, "reports": [1, 1]}]

        sent = {"a": torch.linspace(0, 1, 7, dtype=torch.float64), "b": torch.randn(2, 3, generator=torch.Generator()
                                                                                    .manual_seed(0))}
        tensors, info = comm.broadcast_named(sent if rank == 0 else None, {"round": 3} if rank == 0 else None,
                                             torch.device("cpu"))
        assert info == {"round": 3} and list(tensors) == ["a", "b"]
        assert tensors["a"].dtype == torch.float64 and torch.allclose(tensors["a"], sent["a"])
        assert torch.equal(tensors["b"], sent["b"])

        # mixed dtypes travel in one buffer per dtype and come back in place, exactly (float64 is not rounded)
        mixed = [torch.tensor(1e-12 * (rank + 1) + 1.0, dtype=torch.float64), torch.tensor([rank + 1.0, 2.0]),
                 torch.full((2, 2), 0.25 * (rank + 1), dtype=torch.float64)]
        comm.all_reduce_sum(mixed)
        assert mixed[0].item() == (1.0 + 1e-12) + (1.0 + 2e-12) and mixed[0].dtype == torch.float64
        assert torch.equal(mixed[1], torch.tensor([3.0, 4.0]))
        assert torch.equal(mixed[2], torch.full((2, 2), 0.75, dtype=torch.float64))
    finally:
        dist.destroy_process_group()


def test_gather_broadcast_and_reduce_across_two_ranks(tmp_path):
    mp.spawn(_collectives, args=(str(tmp_path / "store"),), nprocs=2)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """The tiny job run once, uninterrupted, on 2 ranks: (the finished process, its results.json)."""
    out_dir = tmp_path_factory.mktemp("two_ranks")
    done = run_on_two_ranks(tiny_args(out_dir))
    return done, json.loads((out_dir / "results.json").read_text())


@pytest.mark.slow
def test_torchrun_with_two_ranks_matches_one_process(tiny_run, two_rank_run):
    _, single = tiny_run
    done, distributed = two_rank_run
    assert done.stdout.count("global model after round 2") == 1  # only rank 0 prints the table
    for domain, accuracy in single["final"]["accuracy"].items():
        assert abs(distributed["final"]["accuracy"][domain] - accuracy) <= 0.005
    assert distributed["start"] == single["start"]  # round 0: the same model, scored in two shards
    assert [r["clients"] for r in distributed["rounds"]] == [r["clients"] for r in single["rounds"]]
    for record in distributed["rounds"]:  # 5 clients on 2 ranks: 3 + 2
        assert sorted(list(record["processes"].values()).count(rank) for rank in (0, 1)) == [2, 3]


@pytest.mark.slow
def test_an_elastic_restart_after_a_rank_dies_resumes_exactly(two_rank_run, tmp_path):
    """Rank 1 is killed in round 2's local training; torchrun restarts both ranks, which resume from round 1."""
    _, uninterrupted = two_rank_run
    done = run_on_two_ranks(tiny_args(tmp_path), MAX_RESTARTS="1", LORAFAIR_FAIL_AT="2:train:1")
    log = done.stdout + done.stderr
    assert "resuming after round 1" in log and "exitcode: -9" in log  # rank 1 was SIGKILLed, then resumed
    restarted = json.loads((tmp_path / "results.json").read_text())
    assert restarted["final"] == uninterrupted["final"]
    for mine, theirs in zip(restarted["rounds"], uninterrupted["rounds"], strict=True):
        assert (mine["clients"], mine["processes"], mine["train_loss"]) == (theirs["clients"], theirs["processes"],
                                                                         theirs["train_loss"])


@pytest.mark.slow
def test_the_local_bound_on_two_ranks_matches_one_process(tmp_path):
    """Each rank scores a shard of every client's own model, so every rank must hold every client's state after
    each round (and a client trained on one rank in one round may train on the other in the next)."""
    from lorafair.fit import fit

    single = fit(tiny_config(tmp_path / "one", "--federation.setting", "local"))
    run_on_two_ranks(tiny_args(tmp_path / "two", "--federation.setting", "local"))
    distributed = json.loads((tmp_path / "two" / "results.json").read_text())
    assert {rank for r in distributed["rounds"] for rank in r["processes"].values()} == {0, 1}  # both ranks trained
    for domain, accuracy in single["final"]["accuracy"].items():
        assert abs(distributed["final"]["accuracy"][domain] - accuracy) <= 0.005


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedsa_lora", "feddpa"])
def test_a_method_whose_clients_keep_their_own_on_two_ranks_keeps_every_clients_as_one_process_does(method, tmp_path):
    """A client trained on one rank may train on the other next round: every rank must hold what every client keeps
    (FedSA-LoRA: its B; FedDPA: its local adapter and feature summary), and rank 0 checkpoints all of them; the
    two-rank run then matches one process up to float summation order."""
    from lorafair.fit import fit

    args = ("--server.method", method, "--federation.rounds", "3")
    single = fit(tiny_config(tmp_path / "one", *args))
    run_on_two_ranks(tiny_args(tmp_path / "two", *args))
    distributed = json.loads((tmp_path / "two" / "results.json").read_text())
    hosts = [record["processes"] for record in distributed["rounds"]]
    assert any(hosts[t][c] != hosts[t + 1][c] for t in range(2) for c in hosts[t] if c in hosts[t + 1])
    for block in ("final", "personalised"):
        for domain, accuracy in single[block]["accuracy"].items():
            assert abs(distributed[block]["accuracy"][domain] - accuracy) <= 0.005
    ours, theirs = (load_checkpoint(tmp_path / run / "checkpoints" / "round_00003.ckpt")["client_states"]
                    for run in ("two", "one"))
    assert ours.keys() == theirs.keys() and len({key.split(".")[0] for key in ours}) == 6
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_frlora_on_two_ranks_merges_alike_on_every_rank_and_matches_one_process(tmp_path):
    """FRLoRA changes the frozen weights of every rank each round: after the run, each rank's W + s B0 A0 (what it
    holds itself, not rank 0's files) must be the same on both ranks, and the run must match one process up to float
    summation order (the convention of the other two-rank tests: accuracies within half a point, tensors within
    1e-4)."""
    from tests.federated.rank_state import main

    args = ("--server.method", "frlora")
    main(tiny_args(tmp_path / "one", *args))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.federated.rank_state", *tiny_args(tmp_path / "two", *args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=python_environment(), cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lora = tiny_config(tmp_path).lora
    scaling = lora.alpha / lora.r

    def merged(path):
        state = torch.load(path, weights_only=True)
        return {name: weight + scaling * state["lora"][name][1] @ state["lora"][name][0]
                for name, weight in state["base"].items()}

    ranks = [merged(tmp_path / "two" / f"state.rank{rank}.pt") for rank in (0, 1)]
    single = merged(tmp_path / "one" / "state.rank0.pt")
    assert ranks[0].keys() == ranks[1].keys() == single.keys() and len(single) > 0
    for name, weight in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name])
        torch.testing.assert_close(ranks[0][name], weight, rtol=0, atol=1e-4)
    one, two = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two"))
    assert all(len(record["processes"]) == 5 for record in two["rounds"])
    assert {rank for record in two["rounds"] for rank in record["processes"].values()} == {0, 1}
    for domain, accuracy in one["final"]["accuracy"].items():
        assert abs(two["final"]["accuracy"][domain] - accuracy) <= 0.005


@pytest.mark.slow
def test_hetlora_clients_pruned_on_one_rank_train_at_their_pruned_rank_on_the_other(tmp_path):
    """A client prunes on the rank that trained it and may train on the other next round: every rank must hold every
    client's rank. The bytes each client sends follow its rank, so they, and the checkpointed ranks, match one
    process exactly."""
    from lorafair.fit import fit

    args = ("--server.method", "hetlora", "--server.prune_gamma", "0.5", "--server.prune_penalty", "10",
            "--federation.rounds", "3")
    single = fit(tiny_config(tmp_path / "one", *args))
    run_on_two_ranks(tiny_args(tmp_path / "two", *args))
    distributed = json.loads((tmp_path / "two" / "results.json").read_text())
    hosts = [record["processes"] for record in distributed["rounds"]]
    assert any(hosts[t][c] != hosts[t + 1][c] for t in range(2) for c in hosts[t] if c in hosts[t + 1])
    assert [r["bytes_by_client"] for r in distributed["rounds"]] == [r["bytes_by_client"] for r in single["rounds"]]
    ours, theirs = (load_checkpoint(tmp_path / run / "checkpoints" / "round_00003.ckpt")["client_ranks"]
                    for run in ("two", "one"))
    assert ours == theirs and 2 in ours.values()
    for domain, accuracy in single["final"]["accuracy"].items():
        assert abs(distributed["final"]["accuracy"][domain] - accuracy) <= 0.005


@pytest.mark.slow
def test_the_slurm_script_starts_a_rendezvous_job(tmp_path):
    """Run the sbatch script as SLURM would on one node, with srun and scontrol standing in."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name, body in (("srun", 'exec "$@"'), ("scontrol", "echo 127.0.0.1")):
        (fake_bin / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake_bin / name).chmod(0o755)
    env = python_environment(PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1",
                       SLURM_JOB_ID="42", NPROC_PER_NODE="2", RDZV_PORT=str(free_port()), MAX_RESTARTS="0")
    out_dir = tmp_path / "run"
    script = ROOT / "launch" / "slurm_multi_node.sbatch"
    command = ["bash", str(script), *tiny_args(out_dir, "--federation.rounds", "1")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out_dir / "results.json").read_text())
    assert results["final"]["round"] == 1 and set(results["rounds"][0]["processes"].values()) == {0, 1}
    assert results["config"]["num_nodes"] == 1 and results["config"]["resume"] == "auto"


def test_flatten_and_unflatten_round_trip_in_order():
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5.0), "c": torch.randn(2, 2, 2, dtype=torch.float64)}
    flat = flatten(tensors)
    assert flat.dtype == torch.float32 and flat.numel() == 12 + 5 + 8
    back = unflatten(flat, {name: t.shape for name, t in tensors.items()})
    assert list(back) == ["a", "b", "c"]
    for name, tensor in tensors.items():
        torch.testing.assert_close(back[name], tensor.float())
    with pytest.raises(ValueError, match="holds 25 values but the shapes need 12"):
        unflatten(flat, {"a": (3, 4)})
