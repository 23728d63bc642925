"""The transport of a round over torch.distributed: sums over ranks, small reports to every rank, and the server's
answer from rank 0 to every rank.

`TorchDistributedTransport` is what the round loop talks to; a transport for another engine (Flower messages, ...)
offers the same methods. A round is pre-reduced: each rank folds its own clients and the ranks sum the folds'
accumulators (`sum_over_ranks`) instead of gathering every client's payload on rank 0. Collectives need the same
calls with the same shapes on every rank: tensors are summed as one flat buffer per dtype, and a broadcast sends a
small pickled header before the buffer.
With one process (or no process group) every function is a local no-op, so the single-process path needs nothing.
Every collective waits at most the process group's timeout (federation.timeout); a timeout or a lost peer is one
`PeerLost` line naming this rank, never a hang.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from lorafair.errors import UserError


class PeerLost(UserError):
    """A collective failed: another rank did not answer within the process group's timeout, or died."""


def _answered(collective: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a torch.distributed collective; its timeout or a lost peer becomes one PeerLost line naming this rank."""
    try:
        return collective(*args, **kwargs)
    except RuntimeError as err:  # gloo and NCCL report timeouts and closed connections as (subclasses of) it
        rank, world = rank_and_world()
        raise PeerLost(f"rank {rank} of {world} lost contact with the other ranks in {collective.__name__} (no answer "
                       f"within federation.timeout, or a rank died): {' '.join(str(err).split())[:160]}") from err


class Wire(Protocol):
    """A message the transport can carry: named tensors (in `lorafair.keys`' key format) and small
    plain values."""

    def to_wire(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    @classmethod
    def from_wire(cls, tensors: dict[str, Tensor], info: dict[str, Any]) -> Wire: ...


Message = TypeVar("Message", bound=Wire)


class TorchDistributedTransport:
    """Every rank hosts some clients; rank 0 also runs the server. With one process every call is local."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.world = rank_and_world()
        self.device = device

    def share(self, value: Any) -> list[Any]:
        """Every rank's small picklable `value` (a rank's client reports), in rank order, on every rank."""
        return all_gather_objects(value)

    def from_server(self, compute: Callable[[], Message | None], kind: type[Message]) -> Message | None:
        """Run `compute` on rank 0 and deliver its answer to every rank. A UserError it raises is raised on every
        rank, with the same message, so all stop together."""
        tensors, info, error = {}, None, None
        if self.rank == 0:
            try:
                answer = compute()
                if answer is not None:
                    tensors, info = answer.to_wire()
            except UserError as err:
                error = str(err)
        tensors, (info, error) = broadcast_named(tensors, (info, error), self.device)
        if error is not None:
            raise UserError(error)
        return None if info is None else kind.from_wire(tensors, info)

    def sum_over_ranks(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over ranks, in place (the accumulators of a round, evaluation counts)."""
        all_reduce_sum(tensors)

    def wait_for_all(self) -> None:
        barrier()

    def close(self) -> None:
        close()


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


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable `value` in rank order, on every rank; [value] with one process."""
    world = rank_and_world()[1]
    if world == 1:
        return [value]
    received = [None] * world
    _answered(dist.all_gather_object, received, value)
    return received


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
    _answered(dist.broadcast_object_list, header, src=0, device=device)
    info, layout = header[0]
    size = sum(int(torch.Size(shape).numel()) for shape, _ in layout.values())
    buffer = flatten(tensors).to(device) if rank == 0 else torch.empty(size, dtype=torch.float32, device=device)
    _answered(dist.broadcast, buffer, src=0)
    flat = unflatten(buffer, {name: shape for name, (shape, _) in layout.items()})
    return {name: flat[name].to(dtype) for name, (_, dtype) in layout.items()}, info


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Sum tensors over ranks in place with one all_reduce per dtype (the same tensors in the same order on every
    rank); a no-op with one process."""
    if rank_and_world()[1] == 1:
        return
    for dtype in dict.fromkeys(tensor.dtype for tensor in tensors):
        same = [tensor for tensor in tensors if tensor.dtype == dtype]
        buffer = torch.cat([tensor.reshape(-1) for tensor in same])
        _answered(dist.all_reduce, buffer, op=dist.ReduceOp.SUM)
        start = 0
        for tensor in same:
            tensor.copy_(buffer[start:start + tensor.numel()].view_as(tensor))
            start += tensor.numel()


def barrier() -> None:
    """Wait for every rank (ends the training phase of a round at the slowest rank)."""
    if rank_and_world()[1] > 1:
        _answered(dist.barrier)


def close() -> None:
    """Leave the process group together: a rank exiting while another still talks to it can abort at shutdown."""
    if rank_and_world()[1] > 1:
        _answered(dist.barrier)
        dist.destroy_process_group()
