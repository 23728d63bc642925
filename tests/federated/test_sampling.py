"""Client sampling and placement: which clients train in a round and which process hosts each."""

from __future__ import annotations

import random

import pytest

from lorafair.federated.sampling import assign_to_ranks, sample_clients


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
