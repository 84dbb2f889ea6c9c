"""Memory profiling of the first training step(s), from before model load (`profile_memory_from_start`).

A Trainer callback around :class:`memory_profiling.MemoryRecorder`: it starts recording before LLaMA-Factory
loads the model, stops at the configured training step, adds what it measured on the real tensors (parameters,
gradients, optimizer state) and writes the report (`memory_profiling.write_report`). On CUDA that is the
allocator's history (`memory_snapshot.pickle`); on a machine without CUDA, torch.profiler's CPU memory timeline
with its tensor categories (`memory_timeline_cpu.json`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from memory_profiling import MemoryRecorder, storage_bytes, write_report

logger = logging.getLogger("llamafactory.mfsgd.memory")  # under llamafactory.* to share its log handler


def _optimizer_state_tensors(optimizer: Any) -> Iterable[Any]:
    """Every value in `optimizer.state` (per-parameter dicts; non-tensors are skipped by the caller)."""
    for state in getattr(optimizer, "state", {}).values():
        yield from state.values()


class MemorySnapshotSession(TrainerCallback):
    """Record memory from `start()` until a chosen training step, then write the recording and its summary.

    Stop point: after `stop_step` optimizer steps (`on_step_end` once `state.global_step >= stop_step`), or,
    when `stop_accumulation_step > 0` (then `stop_step` is ignored), after that many micro-steps (backward
    passes) of the first optimizer step. HF Trainer calls `on_substep_end` after every micro-batch but the
    last of an accumulation window and `on_pre_optimizer_step` after the last one, so micro-step k < window
    ends at the k-th `on_substep_end` and the last micro-step at the first `on_pre_optimizer_step` (before
    the optimizer steps). Asking for more micro-steps than the window has stops there with a warning.
    Training that ends first stops the recording in `on_train_end`.

    Only rank 0 (`RANK`, default 0) records; elsewhere every method does nothing. Files, in `output_dir`:
    CUDA: `memory_snapshot.pickle`, `memory_snapshot_meta.json`, `memory_viz.html`; CPU:
    `memory_timeline_cpu.json`; both: `memory_timeline.png`, `memory_summary.md`, `memory_summary.json`.
    Starting or stopping the recording raises on failure; the summary, PNG and HTML only log a warning, as
    they can be regenerated with `mfsgd-memory-report`.
    """

    def __init__(
        self,
        output_dir: str,
        stop_step: int | None = 1,
        stop_accumulation_step: int | None = 0,
        max_entries: int | None = 1_000_000,
        device: str | None = None,
    ) -> None:
        # None (YAML null, the authors' declared default) means the default
        stop_step = 1 if stop_step is None else stop_step
        stop_accumulation_step = 0 if stop_accumulation_step is None else stop_accumulation_step
        max_entries = 1_000_000 if max_entries is None else max_entries
        if stop_step < 1:
            raise ValueError(f"stop_step must be >= 1, got {stop_step}")
        if stop_accumulation_step < 0:
            raise ValueError(f"stop_accumulation_step must be >= 0, got {stop_accumulation_step}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._recorder = MemoryRecorder(output_dir, device, max_entries)
        self.output_dir = Path(output_dir)
        self.stop_step = stop_step
        self.stop_accumulation_step = stop_accumulation_step
        self.max_entries = max_entries
        self.is_rank0 = int(os.environ.get("RANK", "0")) == 0
        self.files: dict[str, Path] = {}
        self._state = "idle"
        self._micro_steps = 0
        self._gradient_bytes: int | None = None

    @property
    def device(self) -> torch.device:
        """The recorded device (on CUDA with its index once recording started)."""
        return self._recorder.device

    @property
    def recording(self) -> bool:
        """Whether memory is being recorded right now."""
        return self._state == "recording"

    def start(self) -> None:
        """Begin recording (call before the model is loaded so parameter allocation is included)."""
        if not self.is_rank0:
            return
        if self._state != "idle":
            raise RuntimeError(f"memory snapshot session already {self._state}")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # the summary reports the peaks since recording began
        self._recorder.start()
        self._state = "recording"
        logger.info("Recording memory on %s; results will go to %s", self.device, self.output_dir)

    def stop(self, reason: str, model: Any = None, optimizer: Any = None) -> dict[str, Path]:
        """Stop recording, save the recording and write its summary; return the files written by kind.

        `model` and `optimizer` supply the measured parameter, gradient and optimizer-state bytes.
        Does nothing (returns `{}`) unless recording.
        """
        if not self.recording:
            return {}
        self._state = "stopped"
        measured = self._measure(model, optimizer)
        meta = {"stop_reason": reason, "device": str(self.device), "measured": measured}
        if self.device.type == "cuda":
            meta.update(
                device_index=self.device.index,
                max_entries=self.max_entries,
                allocator_peak_allocated_bytes=torch.cuda.max_memory_allocated(self.device),
                allocator_peak_reserved_bytes=torch.cuda.max_memory_reserved(self.device),
            )
        source = self._recorder.stop(meta)
        self.files = {"recording": source}
        try:
            self.files.update(write_report(source, self.output_dir))
        except Exception as exc:  # the recording is saved; training must go on
            logger.warning(
                "Memory recording saved to %s but summarizing it failed (%s: %s); retry with `mfsgd-memory-report %s`",
                source,
                type(exc).__name__,
                exc,
                source,
            )
        logger.info("Memory profile (%s) written to %s", reason, self.output_dir)
        return self.files

    def _measure(self, model: Any, optimizer: Any) -> dict[str, Any]:
        """Parameter and optimizer-state bytes now, gradient bytes from the last optimizer step (or now)."""
        measured: dict[str, Any] = {}
        if model is not None:
            measured["parameters"] = storage_bytes(model.parameters(), self.device)
            if self._gradient_bytes is None:
                measured["gradients"] = self._grad_bytes(model)
                measured["gradients_at"] = "at the stop point"
            else:
                measured["gradients"] = self._gradient_bytes
                measured["gradients_at"] = "just before the last optimizer step (on_pre_optimizer_step)"
        if optimizer is not None:
            measured["optimizer_state"] = storage_bytes(_optimizer_state_tensors(optimizer), self.device)
        return measured

    def _grad_bytes(self, model: Any) -> int:
        """Bytes of the gradients currently held by the model's parameters on the recorded device."""
        return storage_bytes((p.grad for p in model.parameters()), self.device)

    def on_train_begin(self, args, state, control, **kwargs):
        """Start recording here if `start()` was not called (model loading is then not recorded)."""
        if self.is_rank0 and self._state == "idle":
            logger.warning("MemorySnapshotSession.start() was not called before model load; recording from now on")
            self.start()

    def on_substep_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Count a non-final micro-step of the first optimizer step; stop when enough are done."""
        if not self.recording or self.stop_accumulation_step == 0:
            return
        self._micro_steps += 1
        if self._micro_steps >= self.stop_accumulation_step:
            self.stop(f"after {self._micro_steps} micro-step(s) of the first optimizer step", model, optimizer)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Measure gradient bytes; in micro-step mode the first optimizer step's last micro-step ends here."""
        if not self.recording:
            return
        if model is not None:
            self._gradient_bytes = self._grad_bytes(model)
        if self.stop_accumulation_step == 0:
            return
        self._micro_steps += 1
        if self._micro_steps < self.stop_accumulation_step:
            logger.warning(
                "profile_memory_stop_accumulation_step=%d but the first optimizer step has only %d micro-step(s); "
                "stopping after all of them",
                self.stop_accumulation_step,
                self._micro_steps,
            )
        self.stop(
            f"after {self._micro_steps} micro-step(s) of the first optimizer step, before the optimizer stepped",
            model,
            optimizer,
        )

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Stop after `stop_step` optimizer steps."""
        if self.recording and self.stop_accumulation_step == 0 and state.global_step >= self.stop_step:
            self.stop(f"after optimizer step {state.global_step} (stop_step={self.stop_step})", model, optimizer)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Stop if training ended before the stop point."""
        if self.recording:
            self.stop(
                f"training ended (global_step={state.global_step}) before the requested stop point", model, optimizer
            )
