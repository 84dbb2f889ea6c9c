"""The patch of LLaMA-Factory's ``hparams.parser``: FinetuningArguments gains our keys, parsing gains our checks.

The extended FinetuningArguments runs :func:`.checks.validate_extension_values` in ``__post_init__``;
``get_train_args`` checks the raw config first (spelling, types before any coercion, the AdamW-side preset, keys a
MoFaSGD run would ignore, engines), then the parsed arguments against the training arguments. The CPU emulation
switches (:mod:`.cpu_emulation`) are applied here. With the extension switched off, :func:`guard_parser` refuses
configs that use its keys.
"""

from __future__ import annotations

import dataclasses
import os
from types import ModuleType
from typing import Any

from . import cpu_emulation
from .arguments import EXTENSION_DATACLASSES, extension_field_names
from .checks import (
    check_adamw_side_preset_keys,
    check_unused_keys,
    validate_engine_keys,
    validate_extension_values,
    validate_with_training_args,
)
from .compat import check_llamafactory_version, require
from .config_values import raw_values
from .key_types import check_extension_types, check_key_spelling
from .schedulers import check_scheduler_kwargs
from .tulu3_mixture import prepare_for_training


def _extend_finetuning_arguments(base: type) -> type:
    """A dataclass subclass of LLaMA-Factory's FinetuningArguments with the extension's fields and checks."""

    def __post_init__(self) -> None:
        base.__post_init__(self)
        validate_extension_values(self)

    namespace = {"__post_init__": __post_init__, "__doc__": base.__doc__, "__module__": __name__}
    cls = type("FinetuningArguments", (base, *EXTENSION_DATACLASSES), namespace)
    return dataclasses.dataclass(cls)


def patch_parser(module: ModuleType) -> None:
    """Swap in the extended FinetuningArguments and wrap get_train_args with our parse-time checks."""
    check_llamafactory_version()
    require(module, "FinetuningArguments", "_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS", "get_train_args", "read_args")
    base = module.FinetuningArguments
    extended = _extend_finetuning_arguments(base)
    for name in ("_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS", "_TRAIN_MCA_ARGS"):
        classes = getattr(module, name, None)
        if classes:
            classes[:] = [extended if cls is base else cls for cls in classes]
    module.FinetuningArguments = extended
    cpu_emulation.allow_cpu_pure_bf16(module)
    cpu_emulation.allow_cpu_fsdp2()
    original = module.get_train_args
    known = {f.name for cls in module._TRAIN_ARGS for f in dataclasses.fields(cls)}

    def get_train_args(args=None):
        raw = module.read_args(args)
        values = raw_values(raw)
        check_key_spelling(list(values), known)
        values = check_extension_types(values, command_line=isinstance(raw, list))  # before the parser coerces
        check_adamw_side_preset_keys(values)
        check_unused_keys(values)
        validate_engine_keys(values)
        parsed = original(raw)
        model_args, data_args, training_args, finetuning_args, generating_args = parsed
        validate_with_training_args(finetuning_args, training_args)
        check_scheduler_kwargs(training_args, _fill_scheduler_defaults)
        prepare_for_training(data_args, training_args)
        return parsed

    get_train_args.__doc__ = original.__doc__
    module.get_train_args = get_train_args


def _fill_scheduler_defaults(training_args: Any, num_training_steps: int) -> None:
    """LLaMA-Factory's scheduler-kwargs defaults (WSD stable/decay split), as training will apply them."""
    from llamafactory.train.trainer_utils import create_custom_scheduler

    create_custom_scheduler(training_args, num_training_steps)


def guard_parser(module: ModuleType) -> None:
    """With the extension switched off, refuse configs that use its keys (even under ALLOW_EXTRA_ARGS)."""
    require(module, "get_train_args", "read_args")
    original = module.get_train_args
    ours = extension_field_names()

    def get_train_args(args=None):
        raw = module.read_args(args)
        used = sorted(set(raw_values(raw)) & ours)
        if used:
            raise ValueError(
                f"This config uses {used}, but the MoFaSGD extension is switched off (LLAMAFACTORY_MFSGD="
                f"{os.environ.get('LLAMAFACTORY_MFSGD')}). Unset LLAMAFACTORY_MFSGD to train with MoFaSGD."
            )
        return original(raw)

    module.get_train_args = get_train_args
