"""CUDA allocator history between two optimizer steps, dumped as a snapshot pickle (the `--mem-prof` flags).

The recording is `memory_profiling.MemoryRecorder`'s, the one the LLaMA-Factory runs use. Open the pickle at
https://pytorch.org/memory_viz (it is rendered locally in the browser) or summarize it with `mfsgd-memory-report`.
On a machine without CUDA there is no allocator history to record; the run says so and carries on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from memory_profiling import MemoryRecorder
from scripts.nanogpt.config import MemProfConfig

logger = logging.getLogger("nanogpt")


class CudaMemorySnapshot:
    """Start recording at optimizer step `start_step` (0: before the model is built), dump after `stop_step`.

    The snapshot is written to `run_dir` as `memory_snapshot.pickle`.
    """

    def __init__(self, config: MemProfConfig, device: torch.device, run_dir: Path, is_main: bool) -> None:
        if config.enabled and config.stop_step <= config.start_step:
            raise ValueError(
                f"mem_prof.stop_step ({config.stop_step}) must exceed mem_prof.start_step ({config.start_step})"
            )
        self.config = config
        self.active = config.enabled and is_main and device.type == "cuda"
        self.recorder = MemoryRecorder(run_dir, device, config.max_entries) if self.active else None
        if config.enabled and is_main and device.type != "cuda":
            logger.warning(
                "mem_prof: CUDA memory snapshots need a CUDA device, and this run is on %s; nothing is recorded "
                "(summary.json still reports the peak resident memory of the process).",
                device,
            )

    @property
    def recording(self) -> bool:
        """Whether allocator history is being recorded right now."""
        return self.recorder is not None and self.recorder.recording

    def before_step(self, step: int) -> None:
        """Call before optimizer step `step` (0-based) starts, and once with 0 before building the model."""
        if self.active and not self.recording and step == self.config.start_step:
            self.recorder.start()

    def after_step(self, steps_done: int) -> None:
        """Call after each optimizer step with the number of steps done; dumps once `stop_step` is reached."""
        if self.recording and steps_done >= self.config.stop_step:
            path = self.recorder.stop()
            self.active = False
            logger.info("mem_prof: wrote %s (open it at https://pytorch.org/memory_viz)", path)
