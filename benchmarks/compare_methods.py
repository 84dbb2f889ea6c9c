"""AdamW, LoRA, GaLore, fused GaLore and fused MoFaSGD side by side through LLaMA-Factory's real training path.

For each model size, every method trains the same tiny LLaMA on the same data and batch with its tiny YAML
(``configs/mfsgd/tiny_sft_*.yaml``) and one shared rank, twice, back to back:

1. a **profiled run** of ``--profile-step`` optimizer steps with ``profile_memory_from_start: true`` and
   ``profile_memory_stop_step`` = that step. The peak reported is the one *inside that step's window*
   (from the first micro-batch to ``zero_grad``), not over the whole recording: GaLore's first step (and
   every ``galore_update_interval``-th) is a projector refresh that needs the whole gradient even when fused,
   so it is the steady-state step 2 that shows what fusing saves (the recording's overall peak is listed
   too). On CPU the window and its split by category come from the extension's torch.profiler memory
   timeline (``memory_timeline_cpu.json``); on CUDA from the allocator's peak during the step
   (``torch.cuda.max_memory_allocated``) split with the tensor sizes the extension measured.
   Optimizer-state bytes are the distinct tensor storages in ``optimizer.state`` after that step.
2. a **timed run** of ``--steps`` steps without profiling (the profiler slows every op many times over),
   evaluated once at the end. Step time is the median of the step windows after the first two (lazy
   optimizer state, factor/projector initialisation), excluding data loading, logging and evaluation.

Writes ``bench_methods_<size>.{md,json,png}`` into ``--out`` (and copies them to ``--results-dir`` if given);
the runs themselves go to ``--out/<size>/``. Models are built into git-ignored ``models/`` paths if missing.

    python -m benchmarks.compare_methods [--sizes tiny small] [--steps 40] [--rank 8] [--results-dir results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, machine_description, save_results
from benchmarks.lf_bench import (
    METHODS,
    MODEL_SIZES,
    RunResult,
    ensure_model,
    last_logged,
    median_step_seconds,
    method_config,
    run_training,
    window_peak,
)
from memory_profiling import GROUPS, group_categories

SKIP_STEPS = 2
MIB = 2**20


def step_memory(profiled: RunResult, step: int) -> dict[str, Any]:
    """Peak memory inside optimizer step `step` of a profiled run, split into the table's groups."""
    window = next(s for s in profiled.timing["steps"] if s["step"] == step)
    measured = (profiled.memory_summary or {}).get("measured") or {}
    if profiled.cpu_timeline is not None:
        peak = window_peak(profiled.cpu_timeline, window["begin_us"], window["end_us"])
        return {"total_bytes": peak["total_bytes"], "breakdown": group_categories(peak["by_profiler_category"])}
    total = window["cuda_peak_allocated_bytes"]
    known = {g: measured[g] for g in ("parameters", "gradients", "optimizer_state")}
    rest = total - sum(known.values())
    return {"total_bytes": total, "breakdown": {**known, "activations": None, "other": rest}}


def method_row(method: str, profiled: RunResult, timed: RunResult, profile_step: int) -> dict[str, Any]:
    """One table row from a method's profiled and timed runs."""
    summary = profiled.memory_summary or {}
    return {
        "method": method,
        "trainable_params": timed.timing["trainable_params"],
        "optimizer_state_bytes": (summary.get("measured") or {}).get("optimizer_state"),
        "step_peak": step_memory(profiled, profile_step),
        "recording_peak_bytes": summary.get("peak", {}).get("total_bytes"),
        "memory_method": summary.get("method"),
        "median_step_s": median_step_seconds(timed.timing["steps"], SKIP_STEPS),
        "final_train_loss": last_logged(timed.log_history, "loss"),
        "eval_loss": last_logged(timed.log_history, "eval_loss"),
    }


def add_ratios(rows: list[dict[str, Any]], baseline: str = "adamw") -> None:
    """Set each row's `step_time_ratio` to its median step time over the baseline's (None without baseline)."""
    base = next((r["median_step_s"] for r in rows if r["method"] == baseline), None)
    for row in rows:
        row["step_time_ratio"] = row["median_step_s"] / base if base else None


def _mib(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / MIB:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def render_markdown(table: dict[str, Any]) -> str:
    """The benchmark table as Markdown: setup, one row per method, how each column was measured."""
    setup = table["setup"]
    machine = table["machine"]
    step = setup["profile_step"]
    lines = [
        f"# Methods on `{setup['model']}` ({setup['model_params']:,} parameters)",
        "",
        f"Machine: {machine['device']}, {machine['processor']}, Python {machine['python']}, torch {machine['torch']} "
        f"({machine.get('torch_threads', '?')} threads). "
        f"Batch {setup['per_device_train_batch_size']} x {setup['gradient_accumulation_steps']} accumulation, "
        f"cutoff {setup['cutoff_len']}, rank {setup['rank']} for LoRA/GaLore/MoFaSGD, {setup['steps']} steps "
        f"(timed run), memory from optimizer step {step} of a separate profiled run.",
        "",
        f"| method | trainable params | optimizer state (MiB) | peak in step {step} (MiB) | parameters | gradients "
        "| optimizer state | activations | other | recording peak (MiB) | median step (ms) | x AdamW "
        "| final train loss | eval loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table["rows"]:
        peak = row["step_peak"]
        cells = [
            row["method"],
            f"{row['trainable_params']:,}",
            _mib(row["optimizer_state_bytes"]),
            _mib(peak["total_bytes"]),
            *(_mib(peak["breakdown"][g]) for g in GROUPS),
            _mib(row["recording_peak_bytes"]),
            _num(row["median_step_s"] * 1000, ".1f"),
            _num(row["step_time_ratio"], ".2f"),
            _num(row["final_train_loss"], ".4f"),
            _num(row["eval_loss"], ".4f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## How it was measured", ""] + [f"- {note}" for note in table["notes"]]
    return "\n".join(lines) + "\n"


def notes(memory_method: str | None, steps: int, profile_step: int) -> list[str]:
    """What each column means and which tool measured it."""
    return [
        f"Memory: {memory_method or 'not recorded'} (the extension's `profile_memory_from_start`, "
        f"`profile_memory_stop_step: {profile_step}`). 'peak in step {profile_step}' is the highest total "
        f"inside optimizer step {profile_step} (first micro-batch to zero_grad), split into the profiler's "
        "categories at that instant (CPU; 'other' = input + temporary + autograd_detail + unknown) or, on CUDA, "
        "the allocator's max allocated during the step minus the measured parameter/gradient/optimizer-state "
        "bytes ('other' then holds activations too). 'recording peak' is the highest total over the whole "
        "recording (model load, step 1 included): GaLore's step 1 is a projector refresh with the whole "
        "gradient, fused or not.",
        "Optimizer state: distinct tensor storages in optimizer.state after that step (extension's measurement).",
        f"Step time: median wall time of optimizer steps {SKIP_STEPS + 1}..{steps} of a separate run without "
        "profiling, from on_step_begin (first micro-batch) to on_step_end (after zero_grad); data loading, "
        "logging and evaluation are outside the window. The CPU is shared: compare ratios within this table.",
        "Losses: HF Trainer's last logged training loss (mean over the last logging window) and the eval loss "
        f"on tulu3_demo_eval after step {steps}. Each method uses its tiny config's learning rate; see "
        "results/quality_sweep.md for tuned learning rates.",
    ]


def plot(table: dict[str, Any], path: Path) -> Path:
    """Bar charts: peak by category, optimizer state, step-time ratio and losses, one bar group per method."""
    from matplotlib.figure import Figure

    rows = table["rows"]
    names = [r["method"] for r in rows]
    xs = range(len(rows))
    fig = Figure(figsize=(14, 9), dpi=100, layout="constrained")
    (ax_peak, ax_state), (ax_time, ax_loss) = fig.subplots(2, 2)
    bottom = [0.0] * len(rows)
    for group, color in zip(GROUPS, ("darkgreen", "mediumblue", "goldenrod", "red", "grey")):
        values = [(r["step_peak"]["breakdown"][group] or 0) / MIB for r in rows]
        ax_peak.bar(xs, values, bottom=bottom, color=color, label=group)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax_peak.set_title(f"peak memory in optimizer step {table['setup']['profile_step']} (MiB)")
    ax_peak.legend(fontsize="small")
    ax_state.bar(xs, [(r["optimizer_state_bytes"] or 0) / MIB for r in rows], color="goldenrod")
    ax_state.set_title("optimizer state (MiB)")
    ax_time.bar(xs, [r["step_time_ratio"] or 0 for r in rows], color="tab:blue")
    ax_time.axhline(1.0, color="black", linewidth=1, linestyle=":")
    ax_time.set_title("median step time / AdamW's")
    width = 0.4
    ax_loss.bar([x - width / 2 for x in xs], [r["final_train_loss"] or 0 for r in rows], width, label="train")
    ax_loss.bar([x + width / 2 for x in xs], [r["eval_loss"] or 0 for r in rows], width, label="eval")
    ax_loss.set_title(f"loss after {table['setup']['steps']} steps")
    ax_loss.legend(fontsize="small")
    for ax in (ax_peak, ax_state, ax_time, ax_loss):
        ax.set_xticks(list(xs), names, rotation=20)
    fig.suptitle(f"{table['setup']['model']} on {table['machine']['device']}, torch {table['machine']['torch']}")
    fig.savefig(path, format="png")
    return path


def bench_size(size: str, methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Profiled then timed runs of every method on one model size; returns the table."""
    model_dir = ensure_model(size)
    run_root = Path(args.out) / size
    common = {"per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": args.grad_accum}

    def run_every_method(phase: str, **settings: Any) -> dict[str, RunResult]:
        return {
            method: run_training(method_config(method, model_dir, run_root / phase / method, args.rank, **settings))
            for method in methods
        }

    profiled = run_every_method(
        "profile",
        max_steps=args.profile_step,
        logging_steps=1,
        eval_strategy="no",
        profile_memory_from_start=True,
        profile_memory_stop_step=args.profile_step,
        **common,
    )
    timed = run_every_method(
        "timed",
        max_steps=args.steps,
        logging_steps=5,
        eval_strategy="steps",
        eval_steps=args.steps,
        profile_memory_from_start=False,
        **common,
    )
    rows = [method_row(m, profiled[m], timed[m], args.profile_step) for m in methods]
    add_ratios(rows)
    reference = method_config("adamw", model_dir, run_root, args.rank, **common)
    return {
        "setup": {
            "model": MODEL_SIZES[size]["path"],
            "model_params": timed[methods[0]].timing["total_params"],
            "rank": args.rank,
            "steps": args.steps,
            "profile_step": args.profile_step,
            "per_device_train_batch_size": reference["per_device_train_batch_size"],
            "gradient_accumulation_steps": reference["gradient_accumulation_steps"],
            "cutoff_len": reference["cutoff_len"],
        },
        "machine": machine_description(),
        "rows": rows,
        "notes": notes(rows[0]["memory_method"], args.steps, args.profile_step),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(MODEL_SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the timed run")
    parser.add_argument("--profile-step", type=int, default=2, help="optimizer step whose memory is reported")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_methods"))
    parser.add_argument("--results-dir", default=None, help="also copy the tables and charts here (e.g. results)")
    args = parser.parse_args(argv)
    if args.steps <= SKIP_STEPS:
        parser.error(f"--steps must exceed the {SKIP_STEPS} untimed warm-up steps")
    if args.profile_step < 2:
        parser.error("--profile-step must be >= 2: step 1 sets up optimizer state and GaLore's projector")

    for size in args.sizes:
        start = time.perf_counter()
        table = bench_size(size, args.methods, args)
        table["setup"]["wall_s"] = round(time.perf_counter() - start, 1)
        save_results(table, f"bench_methods_{size}", Path(args.out), args.results_dir, render_markdown, plot)


if __name__ == "__main__":
    main()
