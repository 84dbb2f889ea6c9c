"""Point measurements: the transient peak of one call, the bytes behind a set of tensors, the process's peak."""

from __future__ import annotations

import gc
import resource
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def transient_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by `fn` above what was allocated when it started.

    On CPU this replays the profiler's allocation events ([memory] records) in time order; on CUDA it reads
    torch.cuda.max_memory_allocated around the call. Blocks freed by `fn` that existed before it count as
    negative, as they really do give memory back. Python's cyclic garbage is collected before the call and the
    collector is off during it: otherwise an automatic collection inside `fn` frees tensors of earlier code
    (another test's, on a long pytest run) and lowers the peak by their size.
    """
    device = torch.device(device)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _peak_of(fn, device)
    finally:
        if was_enabled:
            gc.enable()


def _peak_of(fn: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def storage_bytes(tensors: Iterable[Any], device: torch.device) -> int:
    """Bytes of the distinct storages behind `tensors` on `device` (shared or tied storage counts once).

    Anything that is not a tensor (None gradients, step counts kept as numbers) is skipped.
    """
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.device != device:
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def peak_rss_bytes() -> int:
    """The most resident memory this process has held so far (its high-water mark, CPU and host side)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
