"""The LLaMA-Factory internals this extension relies on, checked loudly when a module is patched."""

from __future__ import annotations

from importlib.metadata import version
from types import ModuleType

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
