"""The trainer's pure parts: client sampling and placement, flat buffers, checkpoint files, result records."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lorafair.config import FitConfig
from lorafair.errors import UserError
from lorafair.federated import faults
from lorafair.federated.checkpoints import (
    identity_differences,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    read_round,
    save_checkpoint,
)
from lorafair.federated.launch import launch_fabric
from lorafair.federated.run_folder import accuracy_table, config_to_dict, flatten_config, mean, trajectory_identity
from lorafair.federated.sampling import assign_to_ranks, sample_clients
from lorafair.federated.transport import flatten, unflatten
from lorafair.seeds import derive_seed


def test_sampling_is_a_seeded_sorted_subset_that_changes_with_the_round():
    ids = list(range(30))
    draws = [sample_clients(ids, 18, seed=0, round_index=t) for t in range(1, 6)]
    for draw in draws:
        assert len(draw) == 18 and len(set(draw)) == 18 and draw == sorted(draw) and set(draw) <= set(ids)
    assert draws == [sample_clients(ids, 18, seed=0, round_index=t) for t in range(1, 6)]
    assert len({tuple(draw) for draw in draws}) == 5
    assert sample_clients(ids, 18, seed=1, round_index=1) != draws[0]
    assert sample_clients(ids, 30, seed=0, round_index=1) == ids
    with pytest.raises(ValueError, match="per_round must be in"):
        sample_clients(ids, 31, seed=0, round_index=1)


def test_derived_seeds_differ_by_every_part():
    seeds = {derive_seed("client", s, t, c) for s in range(3) for t in range(3) for c in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed("client", 0, 1, 2) == derive_seed("client", 0, 1, 2) != derive_seed("sample", 0, 1, 2)


def best_makespan(sizes: list[int], world: int) -> int:
    """Smallest possible largest rank load, over every assignment."""
    best = sum(sizes)
    for code in range(world ** len(sizes)):
        loads = [0] * world
        for size in sizes:
            loads[code % world] += size
            code //= world
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_assignment_covers_every_client_once_and_balances_samples(world):
    rng = random.Random(world)
    sizes = {client: rng.randint(10, 500) for client in range(7)}
    hosted = assign_to_ranks(list(sizes), sizes, world)
    assert len(hosted) == world
    assert sorted(c for clients in hosted for c in clients) == list(range(7))
    assert all(clients == sorted(clients) for clients in hosted)
    assert assign_to_ranks(list(reversed(sizes)), sizes, world) == hosted  # input order does not matter
    loads = [sum(sizes[c] for c in clients) for clients in hosted]
    assert max(loads) - min(loads) <= max(sizes.values())
    if world <= 4:  # largest-first greedy is within 4/3 of the best possible
        assert max(loads) <= 4 / 3 * best_makespan(list(sizes.values()), world)
    if world >= 7:
        assert all(len(clients) <= 1 for clients in hosted)


def test_assignment_puts_the_big_client_alone():
    assert assign_to_ranks([0, 1, 2, 3], {0: 100, 1: 30, 2: 30, 3: 30}, 2) == [[0], [1, 2, 3]]


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


def test_a_run_resumed_from_an_older_file_drops_the_later_checkpoints_it_branched_off(tmp_path):
    for round_index in (9, 10):
        save_checkpoint(tmp_path, round_index, {"round": round_index})
    save_checkpoint(tmp_path, 6, {"round": 6})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_00006.ckpt"]


def test_checkpoints_are_atomic_keep_the_previous_one_and_skip_unreadable_ones(tmp_path):
    for round_index in range(1, 5):
        save_checkpoint(tmp_path, round_index, {"round": round_index, "w": torch.full((3,), float(round_index))})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_00003.ckpt", "round_00004.ckpt"]

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, {"round": 5}, before_rename=interrupted)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_00003.ckpt", "round_00004.ckpt"]
    assert not list(tmp_path.glob("*.tmp"))  # the interrupted write's temporary is removed

    newest = tmp_path / "round_00004.ckpt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, e.g. by a full disk
    warnings = []
    path, state = load_latest(tmp_path, warnings.append)
    assert path.name == "round_00003.ckpt" and state["round"] == 3 and torch.equal(state["w"], torch.full((3,), 3.0))
    assert len(warnings) == 1 and "round_00004.ckpt cannot be read" in warnings[0]
    with pytest.raises(UserError, match=r"round_00004\.ckpt cannot be read"):
        load_checkpoint(newest)
    assert load_latest(tmp_path / "missing", warnings.append) is None


def test_identity_ignores_how_a_run_executes_but_not_what_it_computes():
    base = trajectory_identity(flatten_config(config_to_dict(FitConfig())), {"partition": "p"})
    longer = FitConfig()
    longer.federation.rounds, longer.data.num_workers, longer.out_dir = 99, 0, "elsewhere"
    same = trajectory_identity(flatten_config(config_to_dict(longer)), {"partition": "p"})
    assert identity_differences(base, same) == []
    other = FitConfig()
    other.server.method, other.lora.r = "fedit", 8
    changed = trajectory_identity(flatten_config(config_to_dict(other)), {"partition": "q"})
    assert identity_differences(base, changed) == [
        "lora.r: 16 -> 8", "partition: 'p' -> 'q'", "server.method: 'lorafair' -> 'fedit'"]


def test_config_flattens_to_dotted_keys_with_plain_values():
    cfg = FitConfig()
    cfg.model.kwargs = {"depth": 2}
    flat = flatten_config(config_to_dict(cfg))
    assert flat["model.kwargs"] == {"depth": 2} and flat["out_dir"] == "runs/lorafair" and flat["lora.r"] == 16


def test_mean_of_no_values_is_nan():
    assert mean([0.25, 0.5, 1.5]) == 0.75 and math.isnan(mean([]))


def test_accuracy_table_shows_percentages_and_the_mean():
    table = accuracy_table({"clipart": 0.5, "sketch": 0.25}, 0.375, "title")
    assert table.splitlines() == ["title", "domain   top-1 %", "-------  -------", "clipart    50.00",
                                  "sketch     25.00", "mean       37.50"]


def test_fault_injection_checks_its_setting(monkeypatch):
    monkeypatch.setenv(faults.ENV_VAR, "2:nowhere")
    with pytest.raises(ValueError, match="PHASE one of train, gather"):
        faults.maybe_fail(1, "train")
    monkeypatch.setenv(faults.ENV_VAR, "2:train:1")
    monkeypatch.delenv("RANK", raising=False)
    faults.maybe_fail(2, "train")  # another rank (0): nothing happens
    monkeypatch.setenv("RANK", "1")
    faults.maybe_fail(1, "train")  # another round: nothing happens


def test_cpu_threads_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        launch_fabric(FitConfig(out_dir=tmp_path, cpu_threads=before + 1))
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_a_checkpoint_of_an_earlier_version_gives_its_round_records_with_processes(tmp_path):
    """A run resumed from a checkpoint written before `ranks` became `processes` in the round records continues
    with records of this version's keys, so its results.json names them one way."""
    state = {"round": 1, "identity": {}, "lora": {"l": {"A": torch.zeros(2, 3), "B": torch.zeros(3, 2)}},
             "extra": {}, "base": {}, "results": {"rounds": [{"round": 1, "clients": [0], "ranks": {"0": 0}}]}}
    assert read_round(tmp_path / "round_00001.ckpt", state).records == [
        {"round": 1, "clients": [0], "processes": {"0": 0}}]
