"""The patch of LLaMA-Factory's ``train.tuner``: ``run_exp`` hands our callbacks to the trainer it builds.

The callbacks: the memory snapshot session (started before the model loads, so that parameter allocation is
recorded), the diagnostics requests and the gloo drain at exit (:mod:`.gloo_exit`).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from .arguments import ProfileMemoryArguments
from .compat import require
from .config_values import raw_values
from .diagnostics import MfsgdDiagnosticsCallback
from .gloo_exit import gloo_drain_callback
from .key_types import check_extension_types, fill_null_defaults


def _memory_session(values: dict[str, Any]) -> Any:
    """A started MemorySnapshotSession when the config sets `profile_memory_from_start: true`, else None.

    Started here, before LLaMA-Factory loads the model, so that parameter allocation is recorded.
    """
    values = check_extension_types(values)
    keys = {f.name for f in dataclasses.fields(ProfileMemoryArguments)}
    profile = fill_null_defaults(ProfileMemoryArguments(**{k: v for k, v in values.items() if k in keys}))
    if not profile.profile_memory_from_start:
        return None
    from .memory_snapshot import MemorySnapshotSession

    session = MemorySnapshotSession(
        output_dir=values.get("output_dir", "."),
        stop_step=profile.profile_memory_stop_step,
        stop_accumulation_step=profile.profile_memory_stop_accumulation_step,
        max_entries=profile.profile_memory_max_entries,
    )
    session.start()
    return session


def patch_tuner(module: ModuleType) -> None:
    """Hand our callbacks (the memory snapshot session) to the trainer that run_exp builds."""
    require(module, "run_exp", "read_args")
    original = module.run_exp

    def run_exp(args=None, callbacks=None):
        raw = module.read_args(args)
        callbacks = list(callbacks or [])
        session = _memory_session(check_extension_types(raw_values(raw), command_line=isinstance(raw, list)))
        if session is not None:
            callbacks.append(session)
        callbacks.append(MfsgdDiagnosticsCallback())
        callbacks.append(gloo_drain_callback())
        return original(raw, callbacks)

    run_exp.__doc__ = original.__doc__
    module.run_exp = run_exp
