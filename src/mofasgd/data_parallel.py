"""Data-parallel MoFaSGD: average the thin gradient projections across ranks instead of the m x n gradients.

G V and G^T U are linear in G, so the mean over ranks of the local projections equals the projection of
the DDP-averaged gradient: exact, at (m + n) r numbers per matrix instead of m n. The managed matrices
must then be left out of DDP's own gradient reduction (`ignore_managed_in_ddp`), and every rank must hold
the same U, V (true with ``init="weight"``, since DDP ranks start from identical weights).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in `group`, or 1 when torch.distributed is not initialised."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def average_in_place(tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Average `tensors` over ranks with one flattened all-reduce per (dtype, device) bucket."""
    sum_in_place(tensors, group, divide_by=world_size(group))


def average_tensor_(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Average one tensor over ranks in place (no flattened copy: meant for large gradients)."""
    size = world_size(group)
    if size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(size)


def sum_in_place(tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None, divide_by: int = 1) -> None:
    """Sum `tensors` over ranks (then divide by `divide_by`), one flattened all-reduce per (dtype, device)."""
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if divide_by != 1:
            flat.div_(divide_by)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def ignore_managed_in_ddp(model: nn.Module, managed: Iterable[torch.Tensor]) -> list[str]:
    """Tell DDP (before wrapping) not to all-reduce the gradients of the MoFaSGD-managed matrices.

    Uses the module attribute DDP reads at construction (``_ddp_params_and_buffers_to_ignore``); returns
    the names added. Must be called before ``DistributedDataParallel(model)`` / ``accelerator.prepare``.
    """
    wanted = {id(p) for p in managed}
    names = [name for name, p in model.named_parameters() if id(p) in wanted]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = existing + [n for n in names if n not in existing]
    return names
