"""Bytes held by an optimizer's state (torch core only; profiling lives in the `memory_profiling` package)."""

from __future__ import annotations

import torch


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (any torch optimizer)."""
    tensors = (t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    return sum(t.numel() * t.element_size() for t in tensors)
