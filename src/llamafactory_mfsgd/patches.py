"""What the extension changes in LLaMA-Factory, one function per extended module (applied by `activation`).

- ``hparams.parser``: FinetuningArguments gains our keys; parsing checks their spelling and cross-field rules;
  ``MFSGD_CPU_PURE_BF16=1`` lets ``pure_bf16`` run on a CPU (bf16 weights without a GPU, for tests/benchmarks).
- ``data.template``: registers the Tulu 3 chat format as ``tulu_v3`` when LLaMA-Factory has none.
- ``train.trainer_utils``: ``create_custom_optimizer`` builds MoFaSGD / fused GaLore; HF Trainer's gradient
  norm and clipping see the MoFaSGD matrices (whose gradients live as projections in the optimizer);
  ``Trainer.log`` carries MoFaSGD's update diagnostics (``mfsgd/…``).
- ``train.tuner``: ``run_exp`` hands our callbacks (memory snapshot, diagnostics requests) to the trainer.
"""

from __future__ import annotations

import dataclasses
import os
from types import ModuleType
from typing import Any

from .arguments import (
    EXTENSION_DATACLASSES,
    ProfileMemoryArguments,
    check_extension_types,
    check_key_spelling,
    extension_field_names,
    fill_null_defaults,
    validate_engine_keys,
    validate_extension_values,
    validate_with_training_args,
)
from .baselines import apply_baseline_keys
from .compat import check_llamafactory_version, require
from .cuda_cache import release_cache_after_gradient_hooks
from .diagnostics import MfsgdDiagnosticsCallback, add_diagnostics
from .schedulers import check_scheduler_kwargs, wrap_create_custom_scheduler
from .tulu3_mixture import prepare_for_training

CPU_PURE_BF16_ENV = "MFSGD_CPU_PURE_BF16"


def _raw_values(raw: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Top-level keys and values of a parsed YAML/JSON config, or of a `--key value` / `--key=value` command line."""
    if isinstance(raw, dict):
        return raw
    values: dict[str, Any] = {}
    for i, token in enumerate(raw):
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            has_next = i + 1 < len(raw) and not raw[i + 1].startswith("--")
            values[key] = value if sep else (raw[i + 1] if has_next else True)
    return values


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
    allow_cpu_pure_bf16(module)
    original = module.get_train_args
    known = {f.name for cls in module._TRAIN_ARGS for f in dataclasses.fields(cls)}

    def get_train_args(args=None):
        raw = module.read_args(args)
        values = _raw_values(raw)
        check_key_spelling(list(values), known)
        values = check_extension_types(values, command_line=isinstance(raw, list))  # before the parser coerces
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
        used = sorted(set(_raw_values(raw)) & ours)
        if used:
            raise ValueError(
                f"This config uses {used}, but the MoFaSGD extension is switched off (LLAMAFACTORY_MFSGD="
                f"{os.environ.get('LLAMAFACTORY_MFSGD')}). Unset LLAMAFACTORY_MFSGD to train with MoFaSGD."
            )
        return original(raw)

    module.get_train_args = get_train_args


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
        session = _memory_session(check_extension_types(_raw_values(raw), command_line=isinstance(raw, list)))
        if session is not None:
            callbacks.append(session)
        callbacks.append(MfsgdDiagnosticsCallback())
        return original(raw, callbacks)

    run_exp.__doc__ = original.__doc__
    module.run_exp = run_exp


def patch_template(module: ModuleType) -> None:
    """Register the Tulu 3 chat format as `tulu_v3` (the authors' configs use it; 0.9.5 lacks it)."""
    require(module, "TEMPLATES", "register_template")
    if "tulu_v3" in module.TEMPLATES:
        return
    from llamafactory.data.formatter import EmptyFormatter, StringFormatter

    # `<|assistant|>\n` sits in the user slot, so LLaMA-Factory masks it with the prompt and trains on the reply,
    # its EOS and the newline only. That is the Tulu 3 recipe's choice: open-instruct's SFT masking
    # (open_instruct/dataset_transformation.py, sft_tulu_tokenize_and_truncate_v1) ends each masked span with
    # add_generation_prompt=True "to avoid the assistant generation prefix being included in the loss". The
    # authors' fork puts the prefix in the assistant slot and so trains on it.
    module.register_template(
        name="tulu_v3",
        format_user=StringFormatter(slots=["<|user|>\n{{content}}\n<|assistant|>\n"]),
        format_assistant=StringFormatter(slots=["{{content}}", {"eos_token"}, "\n"]),
        format_system=StringFormatter(slots=["<|system|>\n{{content}}\n"]),
        format_prefix=EmptyFormatter(slots=[{"bos_token"}]),
    )


def patch_trainer_utils(module: ModuleType) -> None:
    """Route `use_mfsgd` / `galore_fused` to our optimizers and make HF's grad norm cover MoFaSGD matrices."""
    require(module, "create_custom_optimizer", "create_custom_scheduler")
    original = module.create_custom_optimizer

    def create_custom_optimizer(model, training_args, finetuning_args):
        if getattr(finetuning_args, "use_mfsgd", False):
            from .optimizer_factory import create_mfsgd_optimizer

            return release_cache_after_gradient_hooks(create_mfsgd_optimizer(model, training_args, finetuning_args))
        if getattr(finetuning_args, "galore_fused", False):
            from .galore_factory import create_fused_galore_optimizer

            return apply_baseline_keys(
                create_fused_galore_optimizer(model, training_args, finetuning_args), finetuning_args
            )
        return apply_baseline_keys(original(model, training_args, finetuning_args), finetuning_args)

    create_custom_optimizer.__doc__ = original.__doc__
    module.create_custom_optimizer = create_custom_optimizer
    module.create_custom_scheduler = wrap_create_custom_scheduler(module.create_custom_scheduler)
    _patch_trainer_grad_norm()
    _patch_trainer_log()
    _patch_trainer_resume()
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


def _unwrapped_optimizer(trainer: Any) -> Any:
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "grad_norm"):
        optimizer = optimizer.optimizer
    return optimizer


def _patch_trainer_grad_norm() -> None:
    """HF Trainer clips and logs via clip_grad_norm_(model.parameters()); MoFaSGD answers for its own matrices."""
    from accelerate import Accelerator
    from transformers import Trainer

    require(Trainer, "_clip_grad_norm", "_get_grad_norm")
    require(Accelerator, "unscale_gradients")
    if getattr(Trainer, "__mfsgd_patched__", False):
        return
    original_clip, original_norm = Trainer._clip_grad_norm, Trainer._get_grad_norm

    def _clip_grad_norm(self, model):
        optimizer = _unwrapped_optimizer(self)
        if hasattr(optimizer, "clip_grad_norm_") and hasattr(optimizer, "grad_norm"):
            # like accelerate's clip_grad_norm_: divide fp16-scaled gradients by the loss scale first (once per
            # step; the scaler's step then does not unscale again). A no-op without a loss scaler.
            self.accelerator.unscale_gradients()
            return optimizer.clip_grad_norm_(self.args.max_grad_norm)
        return original_clip(self, model)

    def _get_grad_norm(self, model, grad_norm=None):
        optimizer = _unwrapped_optimizer(self)
        if grad_norm is None and hasattr(optimizer, "grad_norm"):
            self.accelerator.unscale_gradients()  # no clipping this step: unscale here, as HF's norm-only path does
            return optimizer.grad_norm()
        return original_norm(self, model, grad_norm=grad_norm)

    Trainer._clip_grad_norm = _clip_grad_norm
    Trainer._get_grad_norm = _get_grad_norm
    Trainer.__mfsgd_patched__ = True


def _patch_trainer_log() -> None:
    """Trainer.log adds MoFaSGD's diagnostics (collected on logging steps) to every training log entry."""
    from transformers import Trainer

    require(Trainer, "log")
    if getattr(Trainer.log, "__mfsgd_patched__", False):
        return
    original_log = Trainer.log

    def log(self, logs, *args, **kwargs):
        add_diagnostics(getattr(self, "optimizer", None), logs)
        return original_log(self, logs, *args, **kwargs)

    log.__doc__ = original_log.__doc__
    log.__mfsgd_patched__ = True
    Trainer.log = log


def allow_cpu_pure_bf16(module: ModuleType) -> None:
    """With MFSGD_CPU_PURE_BF16=1 and no CUDA, let `pure_bf16` pass LLaMA-Factory's device check.

    The model is then loaded and trained in bf16 on the CPU (no AMP, no fp32 master weights): the same
    weight path as pure_bf16 on a GPU, slower. For tests and benchmarks of bf16 updates without a GPU.
    """
    import torch

    if os.environ.get(CPU_PURE_BF16_ENV, "0") == "1" and not torch.cuda.is_available():
        require(module, "is_torch_bf16_gpu_available")
        module.is_torch_bf16_gpu_available = lambda: True


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _routing_summary(groups: list[dict[str, Any]]) -> str:
    """`2 matrices on MoFaSGD (rank 8) and 17 tensors on AdamW` for a MoFaSGD optimizer's param groups."""
    managed = sum(len(g.get("params", [])) for g in groups if g.get("mofasgd"))
    others = sum(len(g.get("params", [])) for g in groups if not g.get("mofasgd"))
    ranks = sorted({g.get("rank") for g in groups if g.get("mofasgd") and g.get("rank") is not None})
    rank = f" (rank {', '.join(map(str, ranks))})" if ranks else ""
    return f"{_plural(managed, 'matrix', 'matrices')} on MoFaSGD{rank} and {_plural(others, 'tensor')} on AdamW"


def resume_mismatch(
    saved_groups: list[dict[str, Any]],
    running_groups: list[dict[str, Any]],
    checkpoint: str,
    running_name: str = "the optimizer",
    mfsgd_target: str | None = None,
) -> str | None:
    """Why a checkpoint's optimizer state cannot resume into this run's optimizer (use_mfsgd / routing), or None.

    A MoFaSGD state carries the key ``mofasgd`` in every param group; other optimizers' states do not.
    """
    saved_mofasgd = any("mofasgd" in g for g in saved_groups)
    running_mofasgd = any("mofasgd" in g for g in running_groups)
    fresh = (
        f"To change the optimizer, start a new run from the checkpoint's weights instead of resuming it "
        f"(`model_name_or_path: {checkpoint}` without `resume_from_checkpoint`); its optimizer state starts fresh."
    )
    if saved_mofasgd and not running_mofasgd:
        return (
            f"`resume_from_checkpoint: {checkpoint}` holds a MoFaSGD optimizer state "
            f"({_routing_summary(saved_groups)}), but this run has `use_mfsgd: false` and trains with {running_name}. "
            f"To resume it, set `use_mfsgd: true` with the checkpoint's `mfsgd_rank` and `mfsgd_target`. {fresh}"
        )
    if running_mofasgd and not saved_mofasgd:
        tensors = sum(len(g.get("params", [])) for g in saved_groups)
        return (
            f"This run has `use_mfsgd: true`, but the optimizer state in `resume_from_checkpoint: {checkpoint}` "
            f"({_plural(len(saved_groups), 'param group')}, {_plural(tensors, 'tensor')}) was saved by another "
            f"optimizer, not by MoFaSGD (`use_mfsgd: false` when it was saved). Resume it with the settings that "
            f"saved it (`use_mfsgd: false`). {fresh}"
        )
    if not (saved_mofasgd and running_mofasgd):
        return None

    def layout(groups):
        return [(bool(g.get("mofasgd")), len(g.get("params", []))) for g in groups]

    if layout(saved_groups) == layout(running_groups):
        return None
    target = f" (this run: `mfsgd_target: {mfsgd_target}`)" if mfsgd_target is not None else ""
    return (
        f"The MoFaSGD optimizer state in `resume_from_checkpoint: {checkpoint}` routes "
        f"{_routing_summary(saved_groups)}, but this run routes {_routing_summary(running_groups)}: the routing "
        f"changed since the checkpoint was saved: `mfsgd_target`{target}, or which parameters are trainable. "
        f"Resume with the checkpoint's `mfsgd_target`. {fresh}"
    )


def _saved_param_groups(path: str) -> list[dict[str, Any]] | None:
    """The param groups of a saved optimizer state, read without loading its tensors (memory-mapped)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["param_groups"]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError):
        return None  # not a readable optimizer state: HF's own loading reports it


def _warn_fresh_optimizer(trainer: Any, checkpoint: str) -> None:
    from llamafactory.extras.logging import get_logger

    optimizer = _unwrapped_optimizer(trainer)
    if any("mofasgd" in g for g in getattr(optimizer, "param_groups", [])):
        state = "MoFaSGD's momentum factors (U, S, V) and the AdamW moments"
    else:
        state = f"the optimizer's state ({type(optimizer).__name__})"
    get_logger("llamafactory.mfsgd").warning_rank0(
        f"Resuming from {checkpoint}, which holds no optimizer state (no optimizer.pt / scheduler.pt: saved with "
        f"`save_only_model: true`?). The weights and the step count resume, but {state} start from scratch and "
        "the learning-rate schedule restarts at its first step (warm-up included)."
    )


def _patch_trainer_resume() -> None:
    """Resume checks: a clear error when the checkpoint's optimizer is not this run's, a warning when it has none."""
    import transformers.trainer as hf_trainer
    from transformers import Trainer

    require(Trainer, "_load_optimizer_and_scheduler")
    require(hf_trainer, "OPTIMIZER_NAME", "OPTIMIZER_NAME_BIN", "SCHEDULER_NAME")
    if getattr(Trainer, "__mfsgd_resume_patched__", False):
        return
    original = Trainer._load_optimizer_and_scheduler

    def _load_optimizer_and_scheduler(self, checkpoint):
        engines = getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False)
        if checkpoint is None or engines:
            return original(self, checkpoint)
        optimizer_file = os.path.join(checkpoint, hf_trainer.OPTIMIZER_NAME)
        has_optimizer = (
            os.path.isfile(optimizer_file)
            or os.path.isfile(os.path.join(checkpoint, hf_trainer.OPTIMIZER_NAME_BIN))
            or any(
                hf_trainer.OPTIMIZER_NAME_BIN.split(".")[0] in name and os.path.isdir(os.path.join(checkpoint, name))
                for name in os.listdir(checkpoint)
            )
        )
        if not (has_optimizer and os.path.isfile(os.path.join(checkpoint, hf_trainer.SCHEDULER_NAME))):
            _warn_fresh_optimizer(self, checkpoint)  # HF then loads neither, silently
        elif os.path.isfile(optimizer_file) and (saved := _saved_param_groups(optimizer_file)) is not None:
            message = resume_mismatch(
                saved,
                self.optimizer.param_groups,
                checkpoint,
                running_name=type(_unwrapped_optimizer(self)).__name__,
                mfsgd_target=getattr(getattr(self, "finetuning_args", None), "mfsgd_target", None),
            )
            if message:
                raise ValueError(message)
        return original(self, checkpoint)

    _load_optimizer_and_scheduler.__doc__ = original.__doc__
    Trainer._load_optimizer_and_scheduler = _load_optimizer_and_scheduler
    Trainer.__mfsgd_resume_patched__ = True
