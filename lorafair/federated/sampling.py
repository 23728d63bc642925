"""Which clients train in a round and which rank hosts each (the seeds they train with: `lorafair.seeds`).

Pure functions of (seed, round, client): every rank computes the same answers without talking to the others, and a
client trains identically whichever rank hosts it, so one process and N processes (and a resumed run) agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lorafair.seeds import seeded_generator


def sample_clients(client_ids: Sequence[int], per_round: int, seed: int, round_index: int) -> list[int]:
    """The clients that train in `round_index`, sorted by id; all of them when `per_round` covers everyone."""
    if not 0 < per_round <= len(client_ids):
        raise ValueError(f"per_round must be in [1, {len(client_ids)}], got {per_round}")
    if per_round == len(client_ids):
        return sorted(client_ids)
    generator = seeded_generator("sample", seed, round_index)
    picks = torch.randperm(len(client_ids), generator=generator)[:per_round].tolist()
    return sorted(client_ids[i] for i in picks)


def assign_to_ranks(client_ids: Sequence[int], num_samples: Mapping[int, int], world_size: int) -> list[list[int]]:
    """Split clients over ranks so each rank's total sample count is as even as a greedy pass makes it.

    Largest client first, each to the least-loaded rank (lowest rank on ties); ties in size go by client id, so the
    result is deterministic. Each rank's list is sorted by client id.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0] * world_size
    hosted: list[list[int]] = [[] for _ in range(world_size)]
    for client in sorted(client_ids, key=lambda c: (-num_samples[c], c)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        hosted[rank].append(client)
        loads[rank] += num_samples[client]
    return [sorted(clients) for clients in hosted]
