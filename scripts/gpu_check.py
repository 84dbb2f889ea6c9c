"""GPU acceptance run: a ~1B LLaMA-shaped model (or LLaMA-3.1-8B's decoder at 8 k tokens a step, ``--size 8b``)
trained a few steps in pure bf16 by every method, with memory snapshots, compared in one table (`make gpu-check`
-> results/gpu_check.md, `make gpu-check-8b` -> results/gpu_check_8b.md).

On a CUDA machine: builds the model locally (random weights stored in bf16, no hub), then for AdamW, LoRA,
GaLore, fused GaLore and MoFaSGD runs LLaMA-Factory's real training path (``lf_bench.run_training``: a fresh
interpreter, the extension active) with ``pure_bf16: true`` and ``profile_memory_from_start: true``, and
reports peak memory by category (from each run's memory_summary.json), median step time, the optimizer
step's share of it and the time from launch to the end of the first step. Snapshot PNGs are copied next to
the table. On a machine without CUDA it says so in one line and exits 0.

    python -m scripts.gpu_check [--size 1b|8b] [--steps 6] [--out outputs/gpu_check] [--results-dir results]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, machine_description
from benchmarks.lf_bench import MODEL_SIZES, ensure_model, method_config, run_training

METHODS = ("adamw", "lora", "galore", "galore_fused", "mofasgd")
# on request: MoFaSGD started from a randomized top-r SVD of each W (the fast start) instead of the exact one
EXTRA_METHODS = ("mofasgd_fast_start",)


@dataclass(frozen=True)
class GpuModel:
    """A random-weight LLaMA the check trains: its name (also its folder under models/), shape and tokens a step."""

    size: str  # the --size that picks it: 1b, 8b
    name: str
    flags: tuple[str, ...]
    tokens: int  # cutoff_len
    about: str
    packed: bool = False  # pack the samples to `tokens`, so each step trains on that many (else up to that many)

    def build_flags(self) -> list[str]:
        return [*self.flags, "--max-positions", str(self.tokens), "--dtype", "bfloat16"]


def _shape(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> tuple[str, ...]:
    values = (hidden, layers, intermediate, heads, kv_heads, vocab)
    names = ("--hidden", "--layers", "--intermediate", "--heads", "--kv-heads", "--vocab")
    return tuple(part for name, value in zip(names, values) for part in (name, str(value)))


SIZES = {
    # ~0.9 B parameters: LLaMA-3.2-1B-like width and depth (hidden 2048, 16 layers, GQA 32/8 heads, MLP 8192)
    "1b": GpuModel("1b", "llama-1b-bf16", _shape(2048, 16, 8192, 32, 8, 4096), 1024, "~0.9 B parameters"),
    # LLaMA-3.1-8B's decoder (hidden 4096, 32 layers, GQA 32/8, MLP 14336) with a 32 k vocabulary (the demo corpus
    # tokenizer's), ~7.2 B parameters: AdamW's pure-bf16 weights, gradients and moments (~58 GB) fit one 80 GB GPU
    "8b": GpuModel("8b", "llama-8b-bf16", _shape(4096, 32, 14336, 32, 8, 32768), 8192, "~7.2 B parameters", True),
}
for _model in SIZES.values():
    MODEL_SIZES[_model.name] = {"path": f"models/{_model.name}", "flags": _model.build_flags()}
GROUPS = ("parameters", "gradients", "optimizer_state", "activations_and_other")
SNAPSHOT_STOP = 3  # the CUDA memory snapshot records steps 1-3; recording and dumping it slow steps 2-4 down
LOG_EVERY = 5  # logging steps also collect MoFaSGD's diagnostics (an O(m n r) pass per matrix): timed apart


def run_config(
    method: str, model_dir: Path, out: Path, steps: int, rank: int, model: GpuModel | None = None
) -> dict[str, Any]:
    """The method's tiny YAML pointed at a check model (default 1B): pure bf16, memory snapshot of steps 1-3, no
    eval/saves; sequences up to the model's tokens (packed to them for the 8B check)."""
    model = model or SIZES["1b"]
    fast_start = method == "mofasgd_fast_start"
    return method_config(
        "mofasgd" if fast_start else method,
        model_dir,
        out / method,
        rank,
        pure_bf16=True,
        bf16=False,
        max_steps=steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        cutoff_len=model.tokens,
        packing=model.packed,
        logging_steps=LOG_EVERY,
        eval_strategy="no",
        learning_rate=1e-5,
        **({"learning_rate_mfsgd": 1e-5, "learning_rate_adamw": 1e-5} if method.startswith("mofasgd") else {}),
        **({"mfsgd_init": "weight_randomized"} if fast_start else {}),
        profile_memory_from_start=True,
        profile_memory_stop_step=SNAPSHOT_STOP,
    )


def summarize(method: str, launched_us: int, timing: dict[str, Any], memory: dict[str, Any] | None) -> dict:
    """One table row from a run's step timings and memory summary.

    Step time and optimizer share are medians over the clean steps: after the snapshot's (and the next, which
    dumps it) and not logging steps. The optimizer time of the logging steps among them is reported apart.
    """
    steps = timing["steps"]
    settled = [s for s in steps if s["step"] > SNAPSHOT_STOP + 1] or steps[1:] or steps
    clean = [s for s in settled if s["step"] % LOG_EVERY] or settled
    logging = [s for s in settled if not s["step"] % LOG_EVERY]
    step_s = statistics.median((s["end_us"] - s["begin_us"]) / 1e6 for s in clean)
    optimizer_s = statistics.median(s.get("optimizer_us", 0) / 1e6 for s in clean)
    peak = (memory or {}).get("peak") or {}
    return {
        "method": method,
        "peak_bytes": peak.get("total_bytes"),
        "breakdown": peak.get("breakdown") or {},
        "step_s": step_s,
        "optimizer_s": optimizer_s,
        "optimizer_share": optimizer_s / step_s if step_s else None,
        "logging_optimizer_s": statistics.median(s.get("optimizer_us", 0) / 1e6 for s in logging) if logging else None,
        "timed_steps": [s["step"] for s in clean],
        "first_step_s": (steps[0]["end_us"] - launched_us) / 1e6 if steps else None,
        "trainable_params": timing.get("trainable_params"),
    }


def failure_line(error: BaseException) -> str:
    """The line of a failed run's error worth a table cell: the last non-blank one (the exception), pipe-free."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[-1].replace("|", "/")[:160]


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def render_markdown(
    rows: list[dict[str, Any]], machine: dict[str, Any], steps: int, model: GpuModel = SIZES["1b"]
) -> str:
    tokens = f"{model.tokens} tokens (packed)" if model.packed else f"up to {model.tokens} tokens"
    lines = [
        "# GPU acceptance run",
        "",
        f"{model.name} (random weights, bf16, {model.about}), pure bf16, batch 1 x {tokens}, {steps} steps per "
        "method; memory "
        f"from the CUDA snapshot of steps 1-{SNAPSHOT_STOP}. Step time and optimizer share: medians over steps "
        f"after {SNAPSHOT_STOP + 1} that are not logging steps (every {LOG_EVERY}th; there MoFaSGD also collects "
        f"its diagnostics, whose optimizer time is the next column). Machine: {machine['device']}, torch "
        f"{machine['torch']}. Command: `make gpu-check{'' if model.size == '1b' else '-' + model.size}`.",
        "",
        "| method | peak GiB | parameters | gradients | optimizer state | activations+other | step s | "
        "optimizer share | optimizer s, logging step | launch to first step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['method']} | failed: {row['failed']} |" + " |" * 8)
            continue
        b = row["breakdown"]
        share = "n/a" if row["optimizer_share"] is None else f"{100 * row['optimizer_share']:.1f} %"
        lines.append(
            f"| {row['method']} | {_gib(row['peak_bytes'])} | "
            + " | ".join(_gib(b.get(g)) for g in GROUPS)
            + f" | {row['step_s']:.3f} | {share} | {_seconds(row['logging_optimizer_s'])}"
            + f" | {row['first_step_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS + EXTRA_METHODS))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one method's run may take")
    parser.add_argument("--out", default=str(REPO / "outputs" / "gpu_check"))
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--size", choices=list(SIZES), default="1b", help="the check model (see SIZES)")
    args = parser.parse_args(argv)
    model = SIZES[args.size]
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine, nothing run (it needs a GPU).")
        return 0
    model_dir = ensure_model(model.name)
    out = Path(args.out) if args.size == "1b" else Path(args.out) / args.size
    rows = []
    for method in args.methods:
        config = run_config(method, model_dir, out, args.steps, args.rank, model)
        launched = time.time_ns() // 1000
        try:
            run = run_training(config, timeout=args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as error:  # report it and go on with the other methods
            print(f"gpu-check: {method} failed: {error}", flush=True)
            rows.append({"method": method, "failed": failure_line(error)})
        else:
            rows.append(summarize(method, launched, run.timing, run.memory_summary))
            print(rows[-1], flush=True)
        write_report(
            rows, args.steps, out, args.results_dir, model
        )  # after every method, so a cut-off run keeps its rows
    print((out / report_name(model)).read_text())
    return 1 if any("failed" in row for row in rows) else 0


def report_name(model: GpuModel, suffix: str = ".md") -> str:
    """gpu_check.md for the 1B model (the results' historic name), gpu_check_8b.md for the 8B one."""
    return "gpu_check" + ("" if model.size == "1b" else f"_{model.size}") + suffix


def write_report(
    rows: list[dict[str, Any]], steps: int, out: Path, results_dir: str | None, model: GpuModel = SIZES["1b"]
) -> None:
    """The report under `out`; with `results_dir`, also copied there with each method's snapshot PNG."""
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    (out / report_name(model)).write_text(render_markdown(rows, machine, steps, model))
    record = {"model": model.name, "machine": machine, "steps": steps, "rows": rows}
    (out / report_name(model, ".json")).write_text(json.dumps(record, indent=1))
    if results_dir:
        target = Path(results_dir)
        target.mkdir(parents=True, exist_ok=True)
        for name in (report_name(model), report_name(model, ".json")):
            shutil.copy(out / name, target / name)
        for row in rows:
            png = out / row["method"] / "memory_timeline.png"
            if png.exists():
                shutil.copy(png, target / report_name(model, f"_{row['method']}_memory.png"))


if __name__ == "__main__":
    sys.exit(main())
