"""Data-parallel test scaffolding: run a function on gloo ranks, and one backward of an accumulation window."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llamafactory_mfsgd.gloo_exit import exit_spawned_worker
from llamafactory_mfsgd.launcher import free_port


def _rank_entry(rank: int, world: int, port: int, body: Callable, out_path: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = body(rank, world, *args)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()
    exit_spawned_worker()


def run_on_ranks(body: Callable[..., Any], *args: Any, world: int = 2) -> Any:
    """Run ``body(rank, world, *args)`` in `world` gloo processes; return what rank 0 returned (tensors, dicts).

    `body` must be a module-level function (the processes are spawned, so it travels by reference).
    """
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "rank0.pt")
        mp.spawn(_rank_entry, args=(world, free_port(), body, out, args), nprocs=world, join=True)
        return torch.load(out, weights_only=True)


def window_backward(ddp: torch.nn.Module, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch under DDP: gradients are all-reduced only at the window's last micro-batch."""
    if last:
        loss.backward()
        return
    with ddp.no_sync():
        loss.backward()
