"""Compatibility with the upstream versions we run on: checks of the internals we patch, and workarounds.

Checks: :func:`check_llamafactory_version`, :func:`require` and :func:`require_source` fail loudly when
LLaMA-Factory (or transformers) moved an internal the extension patches.

Workarounds for upstream behaviour unrelated to MoFaSGD, applied by :func:`apply_workarounds` when
LLaMA-Factory's ``train.trainer_utils`` loads (see :data:`llamafactory_mfsgd.activation.TARGETS`); drop each
one once the versions it is for are no longer supported:

- ``torch.load(map_location="cpu:N")`` (transformers 5.6 resuming a multi-process CPU run, torch 2.14):
  :func:`_accept_indexed_cpu_map_location`.
"""

from __future__ import annotations

from importlib.metadata import version
from types import ModuleType
from typing import Any

SUPPORTED_LLAMAFACTORY = ("0.9.5",)


def check_llamafactory_version() -> str:
    """Return the installed llamafactory version, or raise if it is not one we test against."""
    installed = version("llamafactory")
    if installed not in SUPPORTED_LLAMAFACTORY:
        raise RuntimeError(
            f"llamafactory {installed} is installed, but llama-factory-mfsgd is tested with "
            f"{', '.join(SUPPORTED_LLAMAFACTORY)} and patches its internals. Install a supported version "
            "(`pip install -e .` pins it) or switch the extension off with LLAMAFACTORY_MFSGD=0."
        )
    return installed


def require(module: ModuleType | type, *names: str) -> None:
    """Raise a clear error if `module` lacks any attribute the patch for it uses."""
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        owner = getattr(module, "__name__", repr(module))
        raise RuntimeError(
            f"{owner} has no {missing}: this llamafactory/transformers version changed the internals that "
            f"llama-factory-mfsgd extends (supported llamafactory: {', '.join(SUPPORTED_LLAMAFACTORY)})."
        )


def require_source(function: Any, *snippets: str) -> None:
    """Raise a clear error if `function`'s source lacks any snippet: the upstream behaviour a patch completes moved."""
    import inspect

    source = inspect.getsource(function)
    missing = [snippet for snippet in snippets if snippet not in source]
    if missing:
        raise RuntimeError(
            f"{function.__qualname__} no longer contains {missing}: this transformers version changed the behaviour "
            f"that llama-factory-mfsgd completes (supported llamafactory: {', '.join(SUPPORTED_LLAMAFACTORY)})."
        )


def apply_workarounds(trainer_utils: ModuleType) -> None:
    """Apply every workaround listed in the module docstring (called when `trainer_utils` loads)."""
    _accept_indexed_cpu_map_location()


def _restore_on_indexed_cpu(storage: Any, location: str) -> Any:
    return storage if location.startswith("cpu:") else None


def _accept_indexed_cpu_map_location() -> None:
    """Let torch.load map to `cpu:N`, which HF Trainer passes when resuming a multi-process CPU (gloo) run.

    transformers 5.6 loads the optimizer with ``map_location=args.device`` (``cpu:0`` on CPU workers) and torch
    2.14 only knows the location ``cpu``; without this, any optimizer's CPU DDP resume fails.
    """
    import torch.serialization

    torch.serialization.register_package(99, lambda obj: None, _restore_on_indexed_cpu)
