"""Activate the extension in every interpreter: a post-import hook on the few llamafactory modules we extend.

A `.pth` file installed next to the package calls :func:`install_import_hook` at interpreter start, so
`llamafactory-cli train`, its torchrun workers and `python run.py` all see MoFaSGD without editing
LLaMA-Factory. Nothing is imported or patched until llamafactory itself is imported. Set
``LLAMAFACTORY_MFSGD=0`` to turn the extension off: configs that use its keys then fail at parse time.
This module is imported at every interpreter start, so it imports only the standard library.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

DISABLE_ENV = "LLAMAFACTORY_MFSGD"

# The whole plan: llamafactory module -> the functions (`module.function` in llamafactory_mfsgd) applied to it,
# in order, right after it executes; each target has its module (lf_<target>.py, webui.py for LlamaBoard's). The
# Trainer patches and the upstream workarounds ride on trainer_utils,
# which every LLaMA-Factory training run imports before it builds a trainer; the `webui` ones build MoFaSGD into
# LlamaBoard (`llamafactory-cli webui`).
TARGETS = {
    "llamafactory.hparams.parser": ("lf_parser.patch_parser",),
    "llamafactory.data.template": ("lf_template.patch_template",),
    "llamafactory.train.trainer_utils": (
        "lf_trainer_utils.patch_trainer_utils",
        "hf_trainer.patch_trainer",
        "compat.apply_workarounds",
    ),
    "llamafactory.train.tuner": ("lf_tuner.patch_tuner",),
    "llamafactory.webui.locales": ("webui.patch_locales",),
    "llamafactory.webui.common": ("webui.patch_common",),
    "llamafactory.webui.components.train": ("webui.patch_train_tab",),
    "llamafactory.webui.runner": ("webui.patch_runner",),
}
DISABLED_TARGETS = {
    "llamafactory.hparams.parser": ("lf_parser.guard_parser",),
    "llamafactory.webui.runner": ("webui.guard_runner",),
}


def env_flag(name: str, default: bool) -> bool:
    """An environment switch: unset or empty gives `default`; `0`, `false`, `no`, `off` (any case) are off.

    Anything else is on. The one rule for the extension's switches: ``LLAMAFACTORY_MFSGD`` (here),
    ``MFSGD_DEBUG_EMPTY_CACHE`` (cuda_cache), ``MFSGD_CPU_PURE_BF16`` and ``MFSGD_CPU_FSDP2`` (cpu_emulation). Config
    values have their own rule, YAML's (:mod:`llamafactory_mfsgd.config_values`); this one lives here because the
    start-up hook may import only the standard library.
    """
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


def is_enabled() -> bool:
    """False when the user switched the extension off with LLAMAFACTORY_MFSGD=0/false/off."""
    return env_flag(DISABLE_ENV, default=True)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the patches for that module."""

    def __init__(self, loader: importlib.abc.Loader, patches: tuple[str, ...]) -> None:
        self._loader = loader
        self._patches = patches

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for name in self._patches:
            owner, function = name.rsplit(".", 1)
            getattr(importlib.import_module(f"llamafactory_mfsgd.{owner}"), function)(module)
        module.__mfsgd_patched__ = True

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds target modules with the other finders and wraps their loader."""

    def __init__(self, targets: dict[str, tuple[str, ...]]) -> None:
        self.targets = targets

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.targets:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, self.targets[fullname])
                return spec
        return None


def install_import_hook() -> None:
    """Install the hook once per interpreter (idempotent).

    Raises:
        RuntimeError: if a target llamafactory module was imported before the hook and is unpatched, since
            the patch could no longer reach the names other modules already copied from it.
    """
    if any(isinstance(f, _PatchingFinder) for f in sys.meta_path):
        return
    targets = TARGETS if is_enabled() else DISABLED_TARGETS
    early = [name for name in targets if name in sys.modules and not hasattr(sys.modules[name], "__mfsgd_patched__")]
    if early:
        raise RuntimeError(
            f"{early} were imported before the MoFaSGD extension was activated; import llamafactory_mfsgd "
            "(or reinstall the package so its .pth start-up hook runs) before llamafactory."
        )
    sys.meta_path.insert(0, _PatchingFinder(targets))


def assert_active() -> None:
    """Raise unless the extension is enabled and LLaMA-Factory's argument parser carries our keys."""
    if not is_enabled():
        raise RuntimeError(f"The MoFaSGD extension is switched off ({DISABLE_ENV}={os.environ[DISABLE_ENV]}).")
    install_import_hook()
    import llamafactory.hparams.parser as parser

    if not getattr(parser, "__mfsgd_patched__", False):
        raise RuntimeError("LLaMA-Factory's argument parser was not patched by the MoFaSGD extension.")
