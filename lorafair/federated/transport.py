"""The transport of a round: client results to the server (rank 0) and its answer back, over torch.distributed.

`TorchDistributedTransport` is what the round loop talks to; a transport for another engine (Flower messages, ...)
offers the same methods. Below it, the collectives move flat float32 buffers. Collectives need the same calls with
the same shapes on every rank: rows are padded to the largest per-rank count (known on every rank from the client
assignment), and a broadcast sends a small pickled header before the buffer.
With one process (or no process group) every function is a local no-op, so the single-process path needs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from lorafair.aggregation import ClientUpdate
from lorafair.errors import UserError
from lorafair.federated.state import ClientResult, pack, pack_pairs, unpack, unpack_pairs

META = ("client", "num_samples", "train_loss", "steps", "skipped_images", "rank")
"""What travels to the server beside each client's tensors, one float64 per entry."""


class Wire(Protocol):
    """A message the transport can carry: named tensors (in `lorafair.federated.state`'s key format) and small
    plain values."""

    def to_wire(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    @classmethod
    def from_wire(cls, tensors: dict[str, Tensor], info: dict[str, Any]) -> Wire: ...


Message = TypeVar("Message", bound=Wire)


class TorchDistributedTransport:
    """Every rank hosts some clients; rank 0 also runs the server. With one process every call is local."""

    def __init__(self, device: torch.device, update_shapes: Mapping[str, torch.Size]) -> None:
        self.rank, self.world = rank_and_world()
        self.device = device
        self.update_shapes = dict(update_shapes)
        """Shape of every tensor of a client update, keyed as the update packs them ("lora/<layer>/A", ...)."""
        self.width = sum(shape.numel() for shape in self.update_shapes.values())

    def gather(self, results: list[ClientResult], hosted: list[list[int]]) -> list[ClientResult] | None:
        """Every rank's client results on rank 0, ordered by client id (None elsewhere). `hosted[rank]` lists the
        clients of each rank, the same list on every rank."""
        counts = [len(clients) for clients in hosted]
        # a lower-rank update travels zero-padded to the global shapes, and is cut back to its rank on arrival
        rows = [flatten({key: _padded(tensor, self.update_shapes[key]) for key, tensor in
                         {**pack_pairs("lora", r.update.lora), **pack("extra", r.update.extra)}.items()})
                for r in results]
        stacked = torch.stack(rows) if rows else torch.zeros(0, self.width, device=self.device)
        metas = [[r.client, r.update.weight, r.train_loss, r.steps, r.skipped_images,
                  next(iter(r.update.lora.values()))[0].shape[0]] for r in results]
        meta_rows = torch.tensor(metas, dtype=torch.float64, device=self.device).view(-1, len(META))
        rows, meta_rows = gather_rows(stacked, counts), gather_rows(meta_rows, counts)
        if self.rank != 0:
            return None
        gathered = [self._result(row, dict(zip(META, meta, strict=True))) for row, meta in
                    zip(rows, meta_rows.tolist(), strict=True)]
        return sorted(gathered, key=lambda result: result.client)

    def _result(self, row: Tensor, meta: dict[str, float]) -> ClientResult:
        flat = unflatten(row, self.update_shapes)
        rank = int(meta["rank"])
        lora = {name: (A[:rank], B[:, :rank]) for name, (A, B) in unpack_pairs(flat, "lora").items()}
        update = ClientUpdate(weight=meta["num_samples"], lora=lora, extra=unpack(flat, "extra"))
        return ClientResult(client=int(meta["client"]), update=update, train_loss=meta["train_loss"],
                            steps=int(meta["steps"]), skipped_images=int(meta["skipped_images"]))

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

    def sum_over_ranks(self, tensor: Tensor) -> Tensor:
        return all_reduce_sum(tensor)

    def wait_for_all(self) -> None:
        barrier()

    def close(self) -> None:
        close()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _padded(tensor: Tensor, shape: torch.Size) -> Tensor:
    """`tensor` in the top-left corner of zeros of `shape` (itself when it has that shape)."""
    if tensor.shape == shape:
        return tensor
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return padded


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
