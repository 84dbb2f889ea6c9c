"""Shared pieces of the LLaMA-Factory benchmarks: models, per-method configs, one timed training run, its results.

A run goes through the real training path: a fresh interpreter (so the extension activates as it does for
``llamafactory-cli train``) runs ``llamafactory_mfsgd.train_entry.train`` (what ``python -m
llamafactory_mfsgd.train_entry`` and ``run.py`` run) on the method's tiny YAML with overrides, plus one callback,
:class:`StepTimer`, that records every optimizer step's wall-clock window (and, on CUDA, the allocator's
peak during it) into a JSON file. The worker side is this module's ``__main__``, run from the repository root::

    python -m benchmarks.lf_bench CONFIG.yaml TIMING.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import REPO
from llamafactory_mfsgd.config_values import load_config
from scripts.build_tiny_llama import ensure_built

CONFIGS = REPO / "configs" / "mfsgd"

# Model sizes built by scripts/build_tiny_llama.py into git-ignored models/ paths.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"path": "models/tiny-llama", "flags": []},
    "tiny-bf16": {"path": "models/tiny-llama-bf16", "flags": ["--dtype", "bfloat16"]},
    "small": {
        "path": "models/tiny-llama-256",
        "flags": ["--hidden", "256", "--layers", "4", "--intermediate", "688"],
    },
}

# Method -> (tiny config, YAML overrides). The rank keys are filled in by `method_config`.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("tiny_sft_adamw.yaml", {}),
    "lora": ("tiny_sft_lora.yaml", {}),
    "galore": ("tiny_sft_galore.yaml", {"galore_fused": False}),
    "galore_fused": ("tiny_sft_galore.yaml", {"galore_fused": True}),
    "mofasgd": ("tiny_sft_mfsgd.yaml", {"mfsgd_fused": True}),
    # every matrix through its gradient hook (the path before the projected Linear backward)
    "mofasgd_hook": ("tiny_sft_mfsgd.yaml", {"mfsgd_fused": True, "mfsgd_projected_backward": False}),
    # the compact AdamW side: factored second moment, no first moment, updated in its gradient hooks
    "mofasgd_compact": (
        "tiny_sft_mfsgd.yaml",
        {"mfsgd_fused": True, "mfsgd_adamw_state": "factored_no_momentum", "mfsgd_fused_adamw_side": True},
    ),
}
RANK_KEYS = {
    "lora": "lora_rank",
    "galore": "galore_rank",
    "galore_fused": "galore_rank",
    "mofasgd": "mfsgd_rank",
    "mofasgd_hook": "mfsgd_rank",
    "mofasgd_compact": "mfsgd_rank",
}


def ensure_model(size: str) -> Path:
    """The model directory of `size`, built with build_tiny_llama.py first when it is missing."""
    spec = MODEL_SIZES[size]
    return ensure_built(REPO / spec["path"], *spec["flags"], env=subprocess_env())


def method_config(method: str, model_dir: Path, output_dir: Path, rank: int, **overrides: Any) -> dict[str, Any]:
    """The method's tiny YAML as a dict, with absolute paths, the shared rank and `overrides` applied."""
    name, method_overrides = METHODS[method]
    config = load_config(str(CONFIGS / name))
    config.update(
        model_name_or_path=str(model_dir),
        dataset_dir=str(REPO / "data"),
        output_dir=str(output_dir),
        plot_loss=False,
        save_strategy="no",
        dataloader_num_workers=0,
        **method_overrides,
    )
    if method in RANK_KEYS:
        config[RANK_KEYS[method]] = rank
    if method == "lora":
        config["lora_alpha"] = 2 * rank
    config.update(overrides)
    return config


def subprocess_env() -> dict[str, str]:
    """This environment, offline, with the venv's bin first on PATH and no multi-process launch requested."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_TORCHRUN", "NPROC_PER_NODE")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONHASHSEED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.setdefault("MPLCONFIGDIR", str(REPO / "outputs" / ".matplotlib"))
    return env


@dataclass
class RunResult:
    """What one training run left behind: its step timings, logged history and memory summary (if profiled)."""

    output_dir: Path
    timing: dict[str, Any]
    log_history: list[dict[str, Any]]
    memory_summary: dict[str, Any] | None
    cpu_timeline: dict[str, Any] | None


def run_training(config: dict[str, Any], timeout: int = 3600, threads: int | None = None) -> RunResult:
    """Train `config` in a fresh interpreter through the extension's entry; raise with the log tail on failure.

    `threads` sets the interpreter's CPU thread count (OMP_NUM_THREADS; torch's default is one per core).
    """
    output_dir = Path(config["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / "bench_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    timing_path = output_dir / "bench_timing.json"
    log_path = output_dir / "bench_train.log"
    env = subprocess_env()
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.lf_bench", str(config_path), str(timing_path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"training failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    state = json.loads((output_dir / "trainer_state.json").read_text())
    summary_path = output_dir / "memory_summary.json"
    timeline_path = output_dir / "memory_timeline_cpu.json"
    return RunResult(
        output_dir=output_dir,
        timing=json.loads(timing_path.read_text()),
        log_history=state["log_history"],
        memory_summary=json.loads(summary_path.read_text()) if summary_path.exists() else None,
        cpu_timeline=json.loads(timeline_path.read_text()) if timeline_path.exists() else None,
    )


def median_step_seconds(steps: list[dict[str, Any]], skip: int) -> float:
    """Median wall time of the recorded steps after the first `skip` (which include lazy state set-up)."""
    durations = [(s["end_us"] - s["begin_us"]) / 1e6 for s in steps[skip:]]
    if not durations:
        raise ValueError(f"no step left to time: {len(steps)} recorded, {skip} skipped")
    return statistics.median(durations)


def last_logged(history: list[dict[str, Any]], key: str) -> float | None:
    """The last value of `key` in HF Trainer's log history (the training loss is averaged since the last log)."""
    values = [entry[key] for entry in history if key in entry]
    return values[-1] if values else None


def window_peak(timeline: dict[str, Any], begin_us: int, end_us: int) -> dict[str, Any]:
    """Peak of a CPU memory timeline inside [begin_us, end_us] (epoch microseconds), split by profiler category.

    The state when the window opens (the last point at or before `begin_us`) counts too, so memory that was
    already held and did not change during the window is included.
    """
    times, rows = timeline["times_us"], timeline["bytes"]
    start = max((i for i, t in enumerate(times) if t <= begin_us), default=0)
    indices = [start] + [i for i, t in enumerate(times) if begin_us < t <= end_us]
    peak = max(indices, key=lambda i: sum(rows[i]))
    return {"total_bytes": sum(rows[peak]), "by_profiler_category": dict(zip(timeline["categories"], rows[peak]))}


def _timer_callback(path: Path) -> Any:
    """A TrainerCallback writing each optimizer step's window (epoch microseconds, the profiler's clock) to `path`."""
    import torch
    from transformers import TrainerCallback

    from memory_profiling import peak_rss_bytes

    class StepTimer(TrainerCallback):
        """Step windows from `on_step_begin` (first micro-batch) to `on_step_end` (after zero_grad), and the
        optimizer's share (clipping excluded: `on_pre_optimizer_step` to `on_optimizer_step`)."""

        def __init__(self) -> None:
            self.record: dict[str, Any] = {"steps": [], "cuda": torch.cuda.is_available()}
            self._begin = self._optimizer_begin = self._optimizer_us = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.record["train_begin_us"] = time.time_ns() // 1000
            params = list(model.parameters()) if model is not None else []
            self.record["trainable_params"] = sum(p.numel() for p in params if p.requires_grad)
            self.record["total_params"] = sum(p.numel() for p in params)

        def on_step_begin(self, args, state, control, **kwargs):
            if self.record["cuda"]:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._begin = time.time_ns() // 1000

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.record["cuda"]:
                torch.cuda.synchronize()
            self._optimizer_begin = time.time_ns() // 1000

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.record["cuda"]:
                torch.cuda.synchronize()
            self._optimizer_us = time.time_ns() // 1000 - self._optimizer_begin

        def on_step_end(self, args, state, control, **kwargs):
            step = {"step": state.global_step, "begin_us": self._begin, "optimizer_us": self._optimizer_us}
            if self.record["cuda"]:
                torch.cuda.synchronize()
                step["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            step["end_us"] = time.time_ns() // 1000
            self.record["steps"].append(step)

        def on_train_end(self, args, state, control, **kwargs):
            self.record["max_rss_kib"] = peak_rss_bytes() // 1024
            path.write_text(json.dumps(self.record, indent=1) + "\n")

    return StepTimer()


def _worker(config_path: str, timing_path: str) -> None:
    from llamafactory_mfsgd.train_entry import train

    train(config_path, callbacks=[_timer_callback(Path(timing_path))])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m benchmarks.lf_bench CONFIG.yaml TIMING.json")
    _worker(sys.argv[1], sys.argv[2])
