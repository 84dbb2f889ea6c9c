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
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

# parameter -> the hook that consumes its gradient (the newest optimizer's); an older optimizer's hook is deactivated
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class GradientConsumerHook:
    """Calls a bound consumer method after each gradient accumulation, while its object lives and owns the param.

    The method is held through a ``WeakMethod``, so the hook never keeps its optimizer (or intake) alive. Ownership
    is a flag on the hook (cleared when a newer optimizer takes the parameter over, or on removal), so a call costs
    a weak-reference read, not a lookup in the ownership table: it runs once per matrix per micro-batch.
    """

    def __init__(self, consumer: weakref.WeakMethod, optimizer_ref: weakref.ref) -> None:
        self.consumer = consumer
        self.optimizer_ref = optimizer_ref
        self.active = True

    def __call__(self, param: torch.Tensor) -> None:
        """Forward to the consumer method, unless its object was collected or lost ownership of `param`."""
        consume = self.consumer() if self.active else None
        if consume is not None:
            consume(param)


def owner_of(param: torch.Tensor) -> Any | None:
    """The live optimizer whose hook consumes `param`'s gradient, or None."""
    hook = _OWNERS.get(param)
    return hook.optimizer_ref() if hook is not None and hook.active else None


class HookRegistry:
    """The hooks one optimizer registered; they are removed when the optimizer is collected or on `remove()`.

    ``consumer`` is a bound method (held weakly) called with each hooked parameter; ``optimizer`` is the optimizer
    that owns those gradients (the method's own object by default), which ownership and take-over warnings name.
    """

    def __init__(self, consumer: Callable[[torch.Tensor], None], optimizer: Any = None) -> None:
        optimizer = consumer.__self__ if optimizer is None else optimizer
        self._consumer = weakref.WeakMethod(consumer)
        self._optimizer_ref = weakref.ref(optimizer)
        self._handles: dict[int, Any] = {}
        self._hooks: dict[int, GradientConsumerHook] = {}
        weakref.finalize(optimizer, _remove_handles, self._handles, self._hooks)

    def register(self, params: Iterable[torch.Tensor]) -> None:
        """Hook every parameter that requires grad and is not hooked yet."""
        optimizer = self._optimizer_ref()
        for p in params:
            if id(p) in self._handles or not p.requires_grad:
                continue
            previous = _OWNERS.get(p)
            previous_owner = owner_of(p)
            if previous_owner is not None and previous_owner is not optimizer:
                warnings.warn(
                    f"A parameter of shape {tuple(p.shape)} already had its gradient consumed by another live "
                    f"{type(previous_owner).__name__}; the newest optimizer takes it over. Call remove_hooks() on the "
                    "old optimizer (or delete it) to silence this.",
                    stacklevel=3,
                )
            if previous is not None and previous.optimizer_ref() is not optimizer:
                previous.active = False
            hook = GradientConsumerHook(self._consumer, self._optimizer_ref)
            _OWNERS[p] = hook
            self._hooks[id(p)] = hook
            self._handles[id(p)] = p.register_post_accumulate_grad_hook(hook)

    def remove(self) -> None:
        """Detach every hook of this registry and give up ownership of its parameters."""
        mine = {id(hook) for hook in self._hooks.values()}
        for p in list(_OWNERS.keys()):
            if id(_OWNERS.get(p)) in mine:
                del _OWNERS[p]
        _remove_handles(self._handles, self._hooks)


def _remove_handles(handles: dict[int, Any], hooks: dict[int, GradientConsumerHook]) -> None:
    for hook in hooks.values():
        hook.active = False
    for handle in handles.values():
        handle.remove()
    handles.clear()
    hooks.clear()
