"""Measure the transient memory a callable allocates (CPU through the profiler, CUDA through the allocator)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def transient_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by `fn` above what was allocated when it started.

    On CPU this replays the profiler's allocation events ([memory] records) in time order; on CUDA it reads
    torch.cuda.max_memory_allocated around the call. Blocks freed by `fn` that existed before it count as
    negative, as they really do give memory back.
    """
    device = torch.device(device)
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


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (any torch optimizer)."""
    tensors = (t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    return sum(t.numel() * t.element_size() for t in tensors)
