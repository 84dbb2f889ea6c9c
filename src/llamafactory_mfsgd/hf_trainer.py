"""What the extension changes in transformers' ``Trainer``, the base class of every LLaMA-Factory trainer.

These are process-wide class patches (LLaMA-Factory subclasses ``Trainer``; it does not wrap it), applied when
LLaMA-Factory's ``train.trainer_utils`` loads (see :data:`llamafactory_mfsgd.activation.TARGETS`) and once only:

- gradient norm and clipping: HF computes them from ``model.parameters()``, where the MoFaSGD matrices hold no
  gradient in fused mode; an optimizer with ``grad_norm`` / ``clip_grad_norm_`` answers for its own matrices;
- ``log``: adds MoFaSGD's update diagnostics (``mfsgd/…``, :mod:`llamafactory_mfsgd.diagnostics`);
- resuming: a clear error when the checkpoint's optimizer is not this run's (``use_mfsgd`` switched, routing
  changed) or its ``optimizer.pt`` is damaged (truncated), a warning when the checkpoint has no optimizer state
  (FSDP included), MoFaSGD's sharded FSDP2 state loaded by parameter name, and the scheduler follows this run's
  base learning rates (an edited ``learning_rate_mfsgd`` / ``learning_rate_adamw`` wins, as MoFaSGD's load logs);
- ``save_model``: under FSDP2 with sharded checkpoints (accelerate's default) the final model is gathered and
  written as a Hugging Face model (weights, config, tokenizer), which transformers leaves out.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from mofasgd.resume import load_fsdp2_sharded_state, routing_layout, scheduler_follows_running_lrs

from .compat import require, require_source
from .diagnostics import add_diagnostics, unwrap_optimizer


def patch_trainer(trainer_utils: ModuleType) -> None:
    """Patch the ``Trainer`` that LLaMA-Factory's ``trainer_utils`` module imports (transformers' own class)."""
    require(trainer_utils, "Trainer")
    _patch_grad_norm(trainer_utils.Trainer)
    _patch_log(trainer_utils.Trainer)
    _patch_resume(trainer_utils.Trainer)
    _patch_save_model(trainer_utils.Trainer)


def _unwrapped_optimizer(trainer: Any) -> Any:
    return unwrap_optimizer(trainer.optimizer)


def _patch_grad_norm(trainer_class: type) -> None:
    """HF Trainer clips and logs via clip_grad_norm_(model.parameters()); MoFaSGD answers for its own matrices."""
    from accelerate import Accelerator

    require(trainer_class, "_clip_grad_norm", "_get_grad_norm")
    require(Accelerator, "unscale_gradients")
    if getattr(trainer_class, "__mfsgd_patched__", False):
        return
    original_clip, original_norm = trainer_class._clip_grad_norm, trainer_class._get_grad_norm

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

    trainer_class._clip_grad_norm = _clip_grad_norm
    trainer_class._get_grad_norm = _get_grad_norm
    trainer_class.__mfsgd_patched__ = True


def _patch_log(trainer_class: type) -> None:
    """Trainer.log adds MoFaSGD's diagnostics (collected on logging steps) to every training log entry."""
    require(trainer_class, "log")
    if getattr(trainer_class.log, "__mfsgd_patched__", False):
        return
    original_log = trainer_class.log

    def log(self, logs, *args, **kwargs):
        add_diagnostics(getattr(self, "optimizer", None), logs)
        return original_log(self, logs, *args, **kwargs)

    log.__doc__ = original_log.__doc__
    log.__mfsgd_patched__ = True
    trainer_class.log = log


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

    if routing_layout(saved_groups) == routing_layout(running_groups):
        return None
    target = f" (this run: `mfsgd_target: {mfsgd_target}`)" if mfsgd_target is not None else ""
    return (
        f"The MoFaSGD optimizer state in `resume_from_checkpoint: {checkpoint}` routes "
        f"{_routing_summary(saved_groups)}, but this run routes {_routing_summary(running_groups)}: the routing "
        f"changed since the checkpoint was saved: `mfsgd_target`{target}, or which parameters are trainable. "
        f"Resume with the checkpoint's `mfsgd_target`. {fresh}"
    )


def _saved_param_groups(path: str) -> list[dict[str, Any]] | None:
    """The param groups of a saved optimizer state, read without loading its tensors (memory-mapped).

    Raises:
        ValueError: naming the file, when it is damaged (truncated by a crash or a full disk while it was saved):
            torch's own error says only `OSError: [Errno 22] Invalid argument` or "failed finding central directory".
    """
    import pickle

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, EOFError):  # or saved in torch's legacy format, which cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        reason = (str(error).splitlines() or [""])[0][:200]
        checkpoint = os.path.dirname(path)
        raise ValueError(
            f"The optimizer state {path} is damaged and cannot be read ({type(error).__name__}: {reason}): it was "
            "probably cut short while being saved (a crash or a full disk). Resume from an earlier checkpoint "
            f"(`resume_from_checkpoint`), or start a new run from this checkpoint's weights (`model_name_or_path: "
            f"{checkpoint}` without `resume_from_checkpoint`); its optimizer state then starts fresh."
        ) from error
    except pickle.UnpicklingError:
        return None  # not an optimizer state that loads with weights_only: HF's own loading reports it
    groups = state.get("param_groups") if isinstance(state, dict) else None
    return groups if isinstance(groups, list) else None


def _warn_fresh_optimizer(trainer: Any, checkpoint: str) -> None:
    from llamafactory.extras.logging import get_logger

    optimizer = _unwrapped_optimizer(trainer)
    if any("mofasgd" in g for g in getattr(optimizer, "param_groups", [])):
        state = "MoFaSGD's momentum factors (U, S, V) and the AdamW moments"
    else:
        state = f"the optimizer's state ({type(optimizer).__name__})"
    if getattr(trainer, "is_fsdp_enabled", False):  # accelerate's names: sharded (DCP) folder or full file
        files = f"no {_optimizer_name()}_0/ or {_optimizer_name()}.bin, or no scheduler.pt: deleted, or"
    else:
        files = "no optimizer.pt / scheduler.pt:"
    get_logger("llamafactory.mfsgd").warning_rank0(
        f"Resuming from {checkpoint}, which holds no optimizer state ({files} saved with "
        f"`save_only_model: true`?). The weights and the step count resume, but {state} start from scratch and "
        "the learning-rate schedule restarts at its first step (warm-up included)."
    )


def _sharded_fsdp2_checkpoint(trainer: Any, checkpoint: str) -> bool:
    """Whether this run is MoFaSGD under FSDP2 and `checkpoint` holds a sharded (DCP) optimizer state."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    optimizer = _unwrapped_optimizer(trainer)
    return (
        getattr(trainer, "is_fsdp_enabled", False)
        and getattr(plugin, "fsdp_version", 1) == 2
        and any("mofasgd" in g for g in getattr(optimizer, "param_groups", []))
        and os.path.isdir(os.path.join(checkpoint, f"{_optimizer_name()}_0"))
    )


def _optimizer_name() -> str:
    from accelerate.utils import OPTIMIZER_NAME

    return OPTIMIZER_NAME


def _load_fsdp2_sharded_optimizer(trainer: Any, checkpoint: str) -> None:
    """Load the checkpoint's sharded FSDP2 optimizer state into MoFaSGD by parameter name (:mod:`mofasgd.resume`)."""
    directory = os.path.join(checkpoint, f"{_optimizer_name()}_0")
    load_fsdp2_sharded_state(trainer.model, _unwrapped_optimizer(trainer), directory)


def _follow_running_base_lrs(trainer: Any) -> None:
    """After a resume, the scheduler follows this run's base learning rates (:mod:`mofasgd.resume`)."""
    scheduler = getattr(trainer, "lr_scheduler", None)
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler
    scheduler_follows_running_lrs(_unwrapped_optimizer(trainer), scheduler)


def _patch_resume(trainer_class: type) -> None:
    """Resume checks: a clear error when the checkpoint's optimizer is not this run's, a warning when it has none."""
    import transformers.trainer as hf_trainer

    require(trainer_class, "_load_optimizer_and_scheduler")
    require(hf_trainer, "OPTIMIZER_NAME", "OPTIMIZER_NAME_BIN", "SCHEDULER_NAME")
    if getattr(trainer_class, "__mfsgd_resume_patched__", False):
        return
    original = trainer_class._load_optimizer_and_scheduler

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and _sharded_fsdp2_checkpoint(self, checkpoint):
            original(self, checkpoint)  # the scheduler; its optimizer load finds no state to fill (see below)
            _load_fsdp2_sharded_optimizer(self, checkpoint)
            return _follow_running_base_lrs(self)
        if checkpoint is None:
            return original(self, checkpoint)
        if getattr(self, "is_deepspeed_enabled", False):  # DeepSpeed restores its optimizer with the engine
            original(self, checkpoint)
            return _follow_running_base_lrs(self)
        optimizer_file = os.path.join(checkpoint, hf_trainer.OPTIMIZER_NAME)
        # HF's own test (FSDP's optimizer.bin / optimizer_0/ included): when it fails, HF loads neither, silently
        has_optimizer = (
            os.path.isfile(optimizer_file)
            or os.path.isfile(os.path.join(checkpoint, hf_trainer.OPTIMIZER_NAME_BIN))
            or any(
                hf_trainer.OPTIMIZER_NAME_BIN.split(".")[0] in name and os.path.isdir(os.path.join(checkpoint, name))
                for name in os.listdir(checkpoint)
            )
        )
        # read first, so that a damaged file is named even when the save it was cut short in left no scheduler.pt
        saved = _saved_param_groups(optimizer_file) if os.path.isfile(optimizer_file) else None
        if not (has_optimizer and os.path.isfile(os.path.join(checkpoint, hf_trainer.SCHEDULER_NAME))):
            _warn_fresh_optimizer(self, checkpoint)  # HF then loads neither, silently
        elif saved is not None:
            message = resume_mismatch(
                saved,
                self.optimizer.param_groups,
                checkpoint,
                running_name=type(_unwrapped_optimizer(self)).__name__,
                mfsgd_target=getattr(getattr(self, "finetuning_args", None), "mfsgd_target", None),
            )
            if message:
                raise ValueError(message)
        original(self, checkpoint)
        _follow_running_base_lrs(self)

    _load_optimizer_and_scheduler.__doc__ = original.__doc__
    trainer_class._load_optimizer_and_scheduler = _load_optimizer_and_scheduler
    trainer_class.__mfsgd_resume_patched__ = True


def _fsdp2_saves_no_model(trainer: Any) -> bool:
    """Whether transformers' save_model writes no weights here: FSDP2 with a sharded (not full) state dict."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    return (
        getattr(trainer, "is_fsdp_enabled", False)
        and getattr(plugin, "fsdp_version", 1) == 2
        and "FULL_STATE_DICT" not in str(plugin.state_dict_type)
    )


def _is_final_save(trainer: Any, output_dir: str | None, internal_call: bool) -> bool:
    """A save of the trained model (the run's output_dir, or asked for by the caller), not of a checkpoint-N."""
    if output_dir is None or not internal_call:
        return True
    return os.path.abspath(output_dir) == os.path.abspath(trainer.args.output_dir)


def _patch_save_model(trainer_class: type) -> None:
    """Under FSDP2 with sharded checkpoints, `save_model` of the trained model writes a loadable HF model.

    transformers 5.6 writes weights under FSDP only for ``FULL_STATE_DICT``; with accelerate's FSDP2 default
    (``SHARDED_STATE_DICT``) the run ends with the DCP shards of its checkpoints and no model in output_dir.
    Here every rank joins accelerate's gather of the full state dict (to the CPU of rank 0, one tensor at a
    time) and rank 0 writes it with HF's own ``_save``: weights, config and tokenizer, as the other engines do.
    Checkpoints (``checkpoint-N``, saved for resuming) stay sharded.
    """
    from accelerate import Accelerator

    require(trainer_class, "save_model", "_save")
    require(Accelerator, "get_state_dict")
    if getattr(trainer_class.save_model, "__mfsgd_patched__", False):
        return
    # the FSDP branch this completes: transformers saves weights under FSDP only for full state dicts
    require_source(trainer_class.save_model, '"FULL_STATE_DICT" in str(self.accelerator.state.fsdp_plugin')
    original = trainer_class.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if _fsdp2_saves_no_model(self) and _is_final_save(self, output_dir, _internal_call):
            state_dict = self.accelerator.get_state_dict(self.model)  # a collective: every rank calls it
            if self.args.should_save:
                self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)
        return original(self, output_dir, _internal_call)  # writes nothing more here (and pushes, if asked)

    save_model.__doc__ = original.__doc__
    save_model.__mfsgd_patched__ = True
    trainer_class.save_model = save_model
