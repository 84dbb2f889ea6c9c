"""MoFaSGD's optimizer diagnostics in the Trainer log, every `logging_steps` (then in report_to and trainer_log).

Before a step that will be logged, the callback asks the optimizer to collect a few statistics of its update
(an extra O(m n r) pass per matrix on that step only); the patched ``Trainer.log`` adds them to the logged
values under ``mfsgd/…`` with one device sync. Their meaning is in :meth:`mofasgd.MoFaSGD.pop_diagnostics`;
``mfsgd/applied_fraction`` well below 1 on bf16 weights means rounding is eating the updates. In a run started from
LlamaBoard they also appear as a line of its log box, under the loss line (its trainer log keeps a fixed set of keys).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

PREFIX = "mfsgd/"
LLAMABOARD_ENV = "LLAMABOARD_ENABLED"  # set by LlamaBoard for the runs it starts


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's / the Trainer's wrappers (MoFaSGD and fused GaLore answer `grad_norm`)."""
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "grad_norm"):
        optimizer = optimizer.optimizer
    return optimizer


def will_log(args: Any, state: Any, step: int) -> bool:
    """Whether the Trainer logs after optimizer step `step` (1-based), by its `logging_*` settings."""
    if str(getattr(args, "logging_strategy", "steps")).split(".")[-1].lower() != "steps":
        return False
    every = int(getattr(state, "logging_steps", 0) or getattr(args, "logging_steps", 0) or 0)
    return (step == 1 and bool(getattr(args, "logging_first_step", False))) or (every > 0 and step % every == 0)


class MfsgdDiagnosticsCallback(TrainerCallback):
    """Asks MoFaSGD to collect update statistics on the steps the Trainer will log (does nothing otherwise)."""

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Request diagnostics for the coming optimizer step when it is a logging step."""
        optimizer = unwrap_optimizer(optimizer)
        if hasattr(optimizer, "request_diagnostics") and will_log(args, state, state.global_step + 1):
            optimizer.request_diagnostics()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """In a LlamaBoard run, write the logged diagnostics to its log box (the running log LLaMA-Factory keeps)."""
        ours = {key[len(PREFIX) :]: value for key, value in (logs or {}).items() if key.startswith(PREFIX)}
        if not ours or not state.is_world_process_zero:
            return
        from llamafactory.extras.logging import get_logger
        from llamafactory.extras.misc import is_env_enabled

        if is_env_enabled(LLAMABOARD_ENV):
            text = ", ".join(f"'{key}': {value:.4g}" for key, value in ours.items())
            get_logger("llamafactory.mfsgd").info_rank0(f"MoFaSGD step {state.global_step}: {{{text}}}")


def add_diagnostics(optimizer: Any, logs: dict[str, float]) -> None:
    """Move the optimizer's collected diagnostics (if any) into a training log entry."""
    optimizer = unwrap_optimizer(optimizer)
    if "loss" in logs and hasattr(optimizer, "pop_diagnostics"):
        logs.update({PREFIX + key: value for key, value in optimizer.pop_diagnostics().items()})
