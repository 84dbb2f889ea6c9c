"""One memory recorder: the CUDA caching allocator's history, or torch.profiler's memory timeline on a CPU.

On CUDA the allocator's history (``torch.cuda.memory._record_memory_history``) is dumped as
``memory_snapshot.pickle`` (torch's own format; https://pytorch.org/memory_viz opens it), with the caller's
measurements in the sidecar ``memory_snapshot_meta.json``. Without CUDA there is no allocator history, so
``torch.profiler`` records the CPU allocations with its tensor categories (parameter, gradient, optimizer
state, activation, ...) and they are saved as ``memory_timeline_cpu.json``. :func:`memory_profiling.write_report`
turns either into a summary, a PNG timeline and, for CUDA, torch's HTML viewer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

from . import report


class MemoryRecorder:
    """Record memory on `device` (default: CUDA when available, else CPU) from `start()` until `stop()`.

    `max_entries` bounds the CUDA history (a ring buffer of allocator events); the CPU profiler keeps everything.
    Starting or stopping raises on failure. The recorder does not reset CUDA's peak counters: callers that report
    them (``torch.cuda.max_memory_allocated``) choose when to.
    """

    def __init__(
        self, output_dir: str | Path, device: str | torch.device | None = None, max_entries: int = 1_000_000
    ) -> None:
        resolved = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if resolved.type not in ("cuda", "cpu"):
            raise ValueError(f"memory profiling supports cuda and cpu devices, got {resolved}")
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {resolved} requested for memory profiling but CUDA is not available")
        self.output_dir = Path(output_dir)
        self.device = resolved
        self.max_entries = max_entries
        self._profiler: profile | None = None
        self._recording = False

    @property
    def recording(self) -> bool:
        """Whether memory is being recorded right now."""
        return self._recording

    @property
    def path(self) -> Path:
        """The file `stop()` writes the recording to."""
        name = report.SNAPSHOT_PICKLE if self.device.type == "cuda" else report.CPU_TIMELINE_JSON
        return self.output_dir / name

    def start(self) -> None:
        """Begin recording (on CUDA, on the current device when `device` named no index)."""
        if self._recording:
            raise RuntimeError("memory recorder already recording")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.memory._record_memory_history(max_entries=self.max_entries)
        else:
            self._profiler = profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
            )
            self._profiler.start()
        self._recording = True

    def stop(self, meta: dict[str, Any] | None = None) -> Path:
        """Stop recording and save it to :attr:`path`, with `meta` (what the caller measured, why it stopped).

        On CUDA `meta` goes to the sidecar file (none is written without it); on CPU into the timeline itself.
        """
        if not self._recording:
            raise RuntimeError("memory recorder is not recording")
        self._recording = False
        path = self.path
        if self.device.type == "cuda":
            try:
                torch.cuda.memory._dump_snapshot(str(path))
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)
            if meta is not None:
                report.snapshot_meta_path(path).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        else:
            path.write_text(json.dumps(self._cpu_timeline(meta or {})), encoding="utf-8")
        return path

    def _cpu_timeline(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Stop the profiler and turn its memory profile into our CPU timeline format (bytes per category)."""
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        times, sizes = MemoryProfileTimeline(profiler._memory_profile())._coalesce_timeline("cpu")
        # _coalesce_timeline puts category c in column _CATEGORY_TO_INDEX[c] + 1; column 0 stays zero.
        names = [("unknown" if category is None else category.name.lower()) for category in _CATEGORY_TO_INDEX]
        return {
            "format": report.CPU_TIMELINE_FORMAT,
            "method": report.CPU_METHOD,
            "device": "cpu",
            "torch_version": torch.__version__,
            "categories": names,
            "times_us": times,
            "bytes": [row[1:] for row in sizes],
            "meta": meta,
        }
