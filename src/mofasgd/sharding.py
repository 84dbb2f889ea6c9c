"""FSDP2 row-sharded matrices: what MoFaSGD needs to step a weight it holds only some rows of.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns each parameter into a DTensor sharded along dim 0 on a
1-D device mesh, and hands the optimizer the matching shard of the reduce-scattered (averaged) gradient. For a
managed m x n matrix each rank keeps U's rows of its own shard (U is a DTensor sharded like W) and the whole of
V and S (plain tensors, identical on every rank). Then G V is local, G^T U is a sum over ranks (one all-reduce
of n r numbers), and the [U | G V] panel is orthonormalised through its (2r)^2 Gram matrix (factor_math). The
2r x 2r core math is replicated: it sees the same all-reduced numbers on every rank, so it gives the same bits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # torch >= 2.5 public DTensor API; the private helper below is pinned and checked at import
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - a torch without DTensor cannot run FSDP2 either
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter, gradient or state of an FSDP2 model)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def check_row_sharded(p: torch.Tensor, name: str) -> None:
    """Refuse a DTensor matrix MoFaSGD cannot step: only FSDP2's Shard(0) on a 1-D mesh is supported."""
    if not is_dtensor(p):
        return
    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"MoFaSGD steps DTensor matrices sharded along rows on a 1-D mesh (FSDP2 `fully_shard`, Shard(0)); "
            f"{name} has placements {placements} on a {p.device_mesh.ndim}-D mesh. HSDP, tensor parallelism and "
            "column sharding are not supported: use plain FSDP2 or DDP."
        )


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place updates reach the DTensor), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def process_group(p: torch.Tensor) -> dist.ProcessGroup | None:
    """The process group over which `p`'s rows are sharded, or None for an ordinary tensor."""
    return p.device_mesh.get_group() if is_dtensor(p) else None


def local_rows(p: torch.Tensor) -> slice:
    """The global row range of this rank's shard of a row-sharded matrix (all rows for a plain tensor)."""
    if not is_dtensor(p):
        return slice(0, p.shape[0])
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return slice(offset[0], offset[0] + shape[0])


def shard_rows_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A DTensor holding `full`'s rows in the layout of `p`'s rows (every rank passes the same `full`)."""
    if not is_dtensor(p):
        return full
    piece = full[local_rows(p)].contiguous()
    return DTensor.from_local(
        piece, p.device_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
    )


def wrap_rows_like(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows `piece` as a DTensor laid out like the DTensor `like` (same mesh, placements, shape)."""
    return DTensor.from_local(
        piece, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Every row of a row-sharded DTensor on every rank (a collective), or the tensor itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def sum_over(group: dist.ProcessGroup | None, tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce `tensor` in place with SUM over `group` (no-op for None); returns it."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def gather_rows(group: dist.ProcessGroup, piece: torch.Tensor, rows_per_rank: list[int]) -> torch.Tensor:
    """Concatenate every rank's row block (..., rows_i, k) in rank order: the whole panel on every rank."""
    width = max(rows_per_rank)
    padded = piece.new_zeros(*piece.shape[:-2], width, piece.shape[-1])
    padded[..., : piece.shape[-2], :] = piece
    blocks = [torch.empty_like(padded) for _ in rows_per_rank]
    dist.all_gather(blocks, padded.contiguous(), group=group)
    return torch.cat([b[..., :rows, :] for b, rows in zip(blocks, rows_per_rank)], dim=-2)


class RowGroup:
    """factor_math.RowReduction for the matrices of one shape sharded alike: sum over ranks, gather, own rows."""

    def __init__(self, p: torch.Tensor) -> None:
        self.group = process_group(p)
        self.counts = rows_per_rank(p)
        self.rows = local_rows(p)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce in place with SUM over the mesh's ranks."""
        return sum_over(self.group, tensor)

    def gather(self, piece: torch.Tensor) -> torch.Tensor:
        """The whole panel from every rank's rows."""
        return gather_rows(self.group, piece, self.counts)

    def mine(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole panel."""
        return full[..., self.rows, :]

    def total(self, piece: torch.Tensor) -> int:
        """The matrix's global row count (every rank's rows)."""
        return sum(self.counts)


def rows_per_rank(p: torch.Tensor) -> list[int]:
    """How many rows of `p` each rank of its mesh holds (FSDP2 splits like torch.chunk; trailing ranks may hold 0)."""
    size = p.device_mesh.size()
    chunk = -(-p.shape[0] // size)
    return [max(0, min(chunk, p.shape[0] - i * chunk)) for i in range(size)]


__all__ = [
    "DTensor",
    "Replicate",
    "RowGroup",
    "Shard",
    "check_row_sharded",
    "full_tensor",
    "gather_rows",
    "is_dtensor",
    "local",
    "local_rows",
    "process_group",
    "rows_per_rank",
    "shard_rows_like",
    "sum_over",
    "wrap_rows_like",
]
