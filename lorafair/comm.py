"""Client updates to rank 0 and the server's answer back, as flat float32 buffers over torch.distributed.

Collectives need the same calls with the same shapes on every rank: rows are padded to the largest per-rank count
(known on every rank from the client assignment), and a broadcast sends a small pickled header before the buffer.
With one process (or no process group) every function is a local no-op, so the single-process path needs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def flatten(tensors: Mapping[str, Tensor]) -> Tensor:
    """Concatenate tensors (in the mapping's order) into one float32 vector."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors.values()])


def unflatten(buffer: Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Inverse of `flatten`: slice `buffer` into tensors of the given shapes, in the mapping's order."""
    out, start = {}, 0
    for name, shape in shapes.items():
        size = int(torch.Size(shape).numel())
        out[name] = buffer[start:start + size].view(*shape)
        start += size
    if start != buffer.numel():
        raise ValueError(f"buffer holds {buffer.numel()} values but the shapes need {start}")
    return out


def gather_rows(rows: Tensor, counts: Sequence[int]) -> Tensor | None:
    """Stack every rank's rows on rank 0, in rank order; None on other ranks.

    `rows` is this rank's (counts[rank], width) tensor; `counts` is the same list on every rank. Rows are padded to
    max(counts) so every rank sends the same shape.
    """
    rank, world = rank_and_world()
    if world == 1:
        return rows
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    received = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, received, dst=0)
    if rank != 0:
        return None
    return torch.cat([block[:count] for block, count in zip(received, counts, strict=True)])


def broadcast_named(tensors: Mapping[str, Tensor] | None, info: Any, device: torch.device) -> tuple[dict[str, Tensor],
                                                                                                      Any]:
    """Send rank 0's named tensors and a small picklable `info` to every rank; other ranks pass None for both.

    The tensors travel as one float32 buffer and come back cast to their original dtypes (float64 values are
    rounded to float32 on the way), on `device`.
    """
    rank, world = rank_and_world()
    if world == 1:
        return {name: t.to(device) for name, t in tensors.items()}, info
    header = [None]
    if rank == 0:
        header = [(info, {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()})]
    dist.broadcast_object_list(header, src=0, device=device)
    info, layout = header[0]
    size = sum(int(torch.Size(shape).numel()) for shape, _ in layout.values())
    buffer = flatten(tensors).to(device) if rank == 0 else torch.empty(size, dtype=torch.float32, device=device)
    dist.broadcast(buffer, src=0)
    flat = unflatten(buffer, {name: shape for name, (shape, _) in layout.items()})
    return {name: flat[name].to(dtype) for name, (_, dtype) in layout.items()}, info


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum a tensor over ranks in place (evaluation counts); a no-op with one process."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every rank (ends the training phase of a round at the slowest rank)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def close() -> None:
    """Leave the process group together: a rank exiting while another still talks to it can abort at shutdown."""
    if rank_and_world()[1] > 1:
        dist.barrier()
        dist.destroy_process_group()
