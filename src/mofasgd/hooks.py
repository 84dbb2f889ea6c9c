"""Gradient hooks that consume a parameter's gradient for an optimizer, without keeping that optimizer alive.

Fused optimizers (MoFaSGD, fused GaLore) take each gradient in a post-accumulate-grad hook and free it. A
hook that held its optimizer strongly would outlive it: a re-created optimizer (HF ``auto_find_batch_size``,
LR finders, hyper-parameter searches) would then see no gradients, because the dead one's hook swallowed
them first. Here a hook holds its optimizer weakly, does nothing once that optimizer is gone or no longer
owns the parameter, and is removed when the optimizer is garbage-collected. The newest optimizer that
registers a parameter owns its gradient.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

# parameter -> weak reference to the optimizer whose hook consumes its gradient
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class GradientConsumerHook:
    """Calls ``optimizer.<method>(param)`` after each gradient accumulation, while the optimizer lives and owns it."""

    def __init__(self, optimizer_ref: weakref.ref, method: str) -> None:
        self.optimizer_ref = optimizer_ref
        self.method = method

    def __call__(self, param: torch.Tensor) -> None:
        """Forward to the optimizer's consumer method, unless it was collected or lost ownership of `param`."""
        owner = _OWNERS.get(param)
        optimizer = self.optimizer_ref()
        if optimizer is None or owner is None or owner() is not optimizer:
            return
        getattr(optimizer, self.method)(param)


def owner_of(param: torch.Tensor) -> Any | None:
    """The live optimizer whose hook consumes `param`'s gradient, or None."""
    owner = _OWNERS.get(param)
    return owner() if owner is not None else None


class HookRegistry:
    """The hooks one optimizer registered; they are removed when the optimizer is collected or on `remove()`."""

    def __init__(self, optimizer: Any, method: str) -> None:
        self._optimizer_ref = weakref.ref(optimizer)
        self._method = method
        self._handles: dict[int, Any] = {}
        weakref.finalize(optimizer, _remove_handles, self._handles)

    def register(self, params: Iterable[torch.Tensor]) -> None:
        """Hook every parameter that requires grad and is not hooked yet."""
        optimizer = self._optimizer_ref()
        for p in params:
            if id(p) in self._handles or not p.requires_grad:
                continue
            previous = owner_of(p)
            if previous is not None and previous is not optimizer:
                warnings.warn(
                    f"A parameter of shape {tuple(p.shape)} already had its gradient consumed by another live "
                    f"{type(previous).__name__}; the newest optimizer takes it over. Call remove_hooks() on the "
                    "old optimizer (or delete it) to silence this.",
                    stacklevel=3,
                )
            _OWNERS[p] = self._optimizer_ref
            self._handles[id(p)] = p.register_post_accumulate_grad_hook(
                GradientConsumerHook(self._optimizer_ref, self._method)
            )

    def remove(self) -> None:
        """Detach every hook of this optimizer and give up ownership of the parameters."""
        optimizer = self._optimizer_ref()
        for p in list(_OWNERS.keys()):
            if optimizer is not None and owner_of(p) is optimizer:
                del _OWNERS[p]
        _remove_handles(self._handles)


def _remove_handles(handles: dict[int, Any]) -> None:
    for handle in handles.values():
        handle.remove()
    handles.clear()
