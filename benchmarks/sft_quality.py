"""SFT quality from a pre-trained base: every method on a log learning-rate grid, extended until the best lr is
inside it, then several seeds at the best lr; mean +- std of eval loss, step time and peak memory of the same runs.

The base is a small LLaMA pre-trained offline by ``scripts/build_pretrained_llama.py`` (Python stdlib sources;
built here on first use, cached under ``models/``): ``--base 1m`` (1.26 M parameters; the full grid) or
``--base 10m`` (10.4 M; the scale check, ``make bench-sft-quality-10m``, a subset of the variants). The SFT task
(``tulu3_demo`` -> ``tulu3_demo_eval``, chat format) was not in its pre-training text. Every run goes through
LLaMA-Factory's real SFT path in a fresh interpreter (``lf_bench.run_training``), with the method's tiny YAML and
these changes: the pre-trained model, ``--steps`` optimizer steps, cosine schedule, evaluation before the first
step and after the last.

Variants: AdamW; LoRA rank 8 and 32; GaLore and fused GaLore (rank 8); MoFaSGD in both update forms (``inv``:
s_hat = min(1/S, max_value), the authors' code default; ``ones``: s_hat = 1, the paper's), ranks 4/8/32, both
initialisations (``weight``/``gradient``); each in fp32 and in pure bf16 (``pure_bf16: true`` on the bf16 copy
of the base; on a CPU through ``MFSGD_CPU_PURE_BF16=1``; MoFaSGD then rounds its updates stochastically, the
default ``mfsgd_stochastic_rounding``; the other methods run LLaMA-Factory's plain pure-bf16 path).

Learning rates: ``--points`` rates spaced half a decade apart around each method's centre; while the best rate
(lowest eval loss, seed 0) is the smallest or largest tried, the next half-decade beyond it is run too (at most
``--max-extend`` times per variant). MoFaSGD's swept rate is ``learning_rate_mfsgd`` (its hidden matrices);
embeddings, LM head and norms use ``learning_rate_adamw`` = ``--mfsgd-adamw-lr`` throughout, and the embeddings'
and head's optimizer state is ``--mfsgd-adamw-state`` (``mfsgd_adamw_state``: full AdamW moments, or Adafactor's
factored second moment with or without AdamW's first moment), updated in their gradient hooks with
``--mfsgd-fused-adamw-side``. Then seeds
1..``--seeds``-1 run at the best rate; the table reports mean +- std (sample std) over the seeds there. The best
rate is chosen on seed 0 alone, which favours it slightly.

Resumable: each finished run leaves ``record.json`` in its directory and is skipped next time (failed runs too,
unless ``--retry-failed``). Results: ``results/sft_quality.md``, ``.png`` and ``.json`` (a list of runs).

    python -m benchmarks.sft_quality --results-dir results                  # the full grid (hours on a CPU)
    python -m benchmarks.sft_quality --variants adamw_fp32 mofasgd_ones_weight_r8_fp32 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, machine_description
from benchmarks.lf_bench import last_logged, median_step_seconds, method_config, run_training
from mofasgd import ADAMW_STATES

BASES = {"1m": REPO / "models" / "pretrained-llama", "10m": REPO / "models" / "pretrained-llama-10m"}
BASE_PAGES = {"1m": "results/pretrained_base.md", "10m": "results/sft_quality_10m/pretrained_base.md"}
PER_DECADE = 2  # grid points per decade: half-decade spacing (x 3.16)


@dataclass(frozen=True)
class Variant:
    """One column of the comparison: an lf_bench method with overrides, a rank, a precision and an lr centre."""

    method: str  # label in the results (adamw, lora, galore, galore_fused, mofasgd_<form>_<init>)
    bench_method: str  # key of lf_bench.METHODS
    rank: int | None
    precision: str  # fp32 or bf16
    lr_center: float
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Unique key, e.g. ``mofasgd_ones_weight_r8_bf16``."""
        rank = f"_r{self.rank}" if self.rank is not None else ""
        return f"{self.method}{rank}_{self.precision}"


def all_variants() -> dict[str, Variant]:
    """The full grid of the comparison, fp32 then bf16."""
    found: list[Variant] = []
    for precision in ("fp32", "bf16"):
        found.append(Variant("adamw", "adamw", None, precision, 1e-3))
        found += [Variant("lora", "lora", r, precision, 3e-3) for r in (8, 32)]
        found += [Variant(m, m, 8, precision, 3e-3) for m in ("galore", "galore_fused")]
        for form in ("inv", "ones"):
            for init in ("weight", "gradient"):
                for rank in (4, 8, 32):
                    overrides = {"mfsgd_use_ones_for_nonzero_s": form == "ones", "mfsgd_init": init}
                    center = 3e-2 if form == "ones" else 3e-3
                    found.append(Variant(f"mofasgd_{form}_{init}", "mofasgd", rank, precision, center, overrides))
    return {v.name: v for v in found}


VARIANTS = all_variants()


def round_lr(lr: float) -> float:
    """Three significant digits, so grid points computed twice compare equal."""
    return float(f"{lr:.3g}")


def grid_lr(center: float, k: int) -> float:
    """The k-th grid point around `center` (k = 0 is the centre), half a decade apart."""
    return round_lr(center * 10 ** (k / PER_DECADE))


def grid_index(center: float, lr: float) -> int:
    """Inverse of `grid_lr`."""
    return round(math.log10(lr / center) * PER_DECADE)


def next_lrs(center: float, results: dict[float, float | None], points: int, max_extend: int) -> list[float]:
    """Learning rates still to run for one variant (seed 0), given `results` {lr: eval loss or None if diverged}.

    First the `points` initial grid points (centred); once all are in, one more point beyond the best rate if
    it sits at the edge of what was tried (a diverged run counts as worse than any finite loss), until
    `max_extend` points beyond the initial grid have been added. An empty list means the sweep is settled.
    """
    low = -(points // 2)
    initial = [grid_lr(center, k) for k in range(low, low + points)]
    missing = [lr for lr in initial if lr not in results]
    if missing:
        return missing
    indices = {grid_index(center, lr): loss for lr, loss in results.items()}
    finite = {k: loss for k, loss in indices.items() if loss is not None and math.isfinite(loss)}
    extended = sum(1 for k in indices if k < low or k >= low + points)
    if extended >= max_extend:
        return []
    if not finite:  # everything diverged: go down
        return [grid_lr(center, min(indices) - 1)]
    best = min(finite, key=finite.get)
    if best == min(indices):
        return [grid_lr(center, best - 1)]
    if best == max(indices):
        return [grid_lr(center, best + 1)]
    return []


def best_lr(results: dict[float, float | None]) -> float | None:
    """The rate with the lowest finite eval loss, or None when none finished."""
    finite = {lr: loss for lr, loss in results.items() if loss is not None and math.isfinite(loss)}
    return min(finite, key=finite.get) if finite else None


def at_edge(lr: float, results: dict[float, float | None]) -> bool:
    """Whether `lr` is the smallest or largest rate tried."""
    return lr in (min(results), max(results))


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (first-seen order): best lr (seed 0), mean/std of eval loss over seeds there, cost."""
    rows = []
    for name in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == name]
        sweep = {r["lr"]: r["eval_loss"] for r in runs if r["seed"] == 0}
        lr = best_lr(sweep)
        row = {
            "variant": name,
            "method": runs[0]["method"],
            "rank": runs[0]["rank"],
            "precision": runs[0]["precision"],
            "lrs": sorted(sweep),
            "best_lr": lr,
            "diverged_lrs": sorted(k for k, v in sweep.items() if v is None),
        }
        if lr is not None:
            at_best = [r for r in runs if r["lr"] == lr and r["eval_loss"] is not None]
            losses = [r["eval_loss"] for r in at_best]
            row.update(
                edge=at_edge(lr, sweep),
                seeds=sorted(r["seed"] for r in at_best),
                eval_loss_mean=statistics.fmean(losses),
                eval_loss_std=statistics.stdev(losses) if len(losses) > 1 else None,
                base_eval_loss=at_best[0].get("base_eval_loss"),
                step_time_s=statistics.fmean(r["step_time_s"] for r in at_best),
                peak_rss_mib=max(r["peak_rss_mib"] for r in at_best),
                cuda_peak_mib=max((r.get("cuda_peak_mib") or 0) for r in at_best) or None,
            )
        rows.append(row)
    return rows


def _fmt_loss(row: dict[str, Any]) -> str:
    if row["best_lr"] is None:
        return "n/a"
    std = "" if row["eval_loss_std"] is None else f" ± {row['eval_loss_std']:.4f}"
    return f"{row['eval_loss_mean']:.4f}{std}"


def _adamw_state_note(state: str) -> str:
    return "" if state == "full" else f", embeddings/head with the `{state}` state (`mfsgd_adamw_state`)"


def render_markdown(result: dict[str, Any]) -> str:
    """Summary per variant, what was not run, then every run."""
    setup, machine, runs = result["setup"], result["machine"], result["runs"]
    rows = summarize(runs)
    base = setup["base"]
    lines = [
        "# SFT quality from a pre-trained base",
        "",
        f"Base: `{base['path']}` ({base.get('parameters', 0):,} parameters, pre-trained on "
        f"{base.get('train_tokens_seen', 0):,} tokens of Python stdlib sources; validation loss "
        f"{base.get('val_loss', float('nan')):.3f} vs unigram {base.get('unigram', float('nan')):.3f}, see "
        f"`{base.get('page', BASE_PAGES['1m'])}`). SFT task held out from pre-training: tulu3_demo "
        f"(400 conversations) -> eval loss on tulu3_demo_eval (60). {setup['steps']} steps, batch {setup['batch']}, "
        "cosine schedule. "
        f"Learning rates: {setup['points']} half-decade grid points per method, extended by up to "
        f"{setup['max_extend']} while the best is at an edge; seeds 0..{setup['seeds'] - 1} at the best rate "
        f"(chosen on seed 0). MoFaSGD's embeddings/head/norms: AdamW at {setup['mfsgd_adamw_lr']:g}"
        f"{_adamw_state_note(setup.get('mfsgd_adamw_state', 'full'))}.",
        f"Machine: {machine['device']}, torch {machine['torch']} ({machine.get('torch_threads', '?')} threads), "
        "shared with other jobs: step times are comparable only roughly. Peak memory on a CPU is the worker's "
        "max RSS, dominated by the interpreter and libraries (differences between methods on this small model "
        "are far below it; see `results/bench_methods_*.md` for memory by category). bf16 = `pure_bf16` on "
        "bf16 weights (MoFaSGD with stochastic rounding; others round to nearest).",
        "",
        "## Best learning rate per method",
        "",
        "| method | rank | precision | best lr | eval loss (mean ± std) | seeds | lrs tried | "
        "step s | peak RSS MiB | note |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in rows:
        notes = []
        if row["best_lr"] is not None and row["edge"]:
            notes.append("**best lr at the grid edge**")
        if row["diverged_lrs"]:
            notes.append("diverged/failed at " + ", ".join(f"{lr:g}" for lr in row["diverged_lrs"]))
        if row["best_lr"] is not None and len(row["seeds"]) < setup["seeds"]:
            notes.append(f"only {len(row['seeds'])} seed(s)")
        rank = "" if row["rank"] is None else str(row["rank"])
        lrs = ", ".join(f"{lr:g}" for lr in row["lrs"])
        if row["best_lr"] is None:
            lines.append(
                f"| {row['method']} | {rank} | {row['precision']} | n/a | n/a | 0 | {lrs} | | | no finite run |"
            )
            continue
        lines.append(
            f"| {row['method']} | {rank} | {row['precision']} | {row['best_lr']:g} | {_fmt_loss(row)} | "
            f"{len(row['seeds'])} | {lrs} | {row['step_time_s']:.3f} | {row['peak_rss_mib']:.0f} | "
            f"{'; '.join(notes)} |"
        )
    base_losses = {f"{r['precision']} {r['base_eval_loss']:.4f}" for r in runs if r.get("base_eval_loss") is not None}
    if base_losses:
        lines += ["", f"Eval loss of the base before SFT (step 0): {', '.join(sorted(base_losses))}."]
    not_run = [name for name in VARIANTS if name not in {r["variant"] for r in runs}]
    unsettled = [r["variant"] for r in rows if r["best_lr"] is None or r["edge"] or len(r["seeds"]) < setup["seeds"]]
    lines += ["", "## Not done", ""]
    if not_run:
        lines.append(f"Variants of the full grid not run at all ({len(not_run)}): {', '.join(not_run)}.")
    if unsettled:
        lines.append(
            f"Variants whose sweep is incomplete (best lr at an edge, or fewer than {setup['seeds']} seeds): "
            f"{', '.join(unsettled)}."
        )
    if not not_run and not unsettled:
        lines.append("Nothing: every variant has its best lr inside the grid and all seeds.")
    lines += ["", "## Every run", "", "| variant | lr | seed | eval loss | train loss | status | step s |"]
    lines.append("|---|---:|---:|---:|---:|---|---:|")
    for r in runs:
        loss = "n/a" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        train = "n/a" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"
        step = "" if r.get("step_time_s") is None else f"{r['step_time_s']:.3f}"
        lines.append(f"| {r['variant']} | {r['lr']:g} | {r['seed']} | {loss} | {train} | {r['status']} | {step} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Eval loss (seed 0) against learning rate, one panel per precision; error bars at the best rate."""
    from matplotlib.figure import Figure

    runs = result["runs"]
    precisions = list(dict.fromkeys(r["precision"] for r in runs)) or ["fp32"]
    fig = Figure(figsize=(7 * len(precisions), 5.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(precisions), squeeze=False)[0]
    rows = {row["variant"]: row for row in summarize(runs)}
    for ax, precision in zip(axes, precisions):
        for name in dict.fromkeys(r["variant"] for r in runs if r["precision"] == precision):
            points = sorted((r["lr"], r["eval_loss"]) for r in runs if r["variant"] == name and r["seed"] == 0)
            points = [(lr, loss) for lr, loss in points if loss is not None]
            (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            row = rows[name]
            if row["best_lr"] is not None and row["eval_loss_std"] is not None:
                ax.errorbar(
                    [row["best_lr"]],
                    [row["eval_loss_mean"]],
                    yerr=[row["eval_loss_std"]],
                    color=line.get_color(),
                    capsize=4,
                    marker="s",
                )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (MoFaSGD: its matrices' rate)")
        ax.set_ylabel(f"eval loss after {result['setup']['steps']} steps")
        ax.set_title(f"SFT from the pre-trained base, {precision}")
        ax.legend(fontsize="x-small")
    fig.savefig(path, format="png")
    return path


def run_one(
    variant: Variant, lr: float, seed: int, args: argparse.Namespace, model_dir: Path
) -> dict[str, Any] | None:
    """Train one (variant, lr, seed), or read its record when it already ran; return the record (None: not run
    and ``--report-only``)."""
    adamw_side = ""
    if variant.bench_method == "mofasgd":  # the default full state keeps the names of runs made before the option
        state = "" if args.mfsgd_adamw_state == "full" else f"_{args.mfsgd_adamw_state}"
        state += "_fusedside" if args.mfsgd_fused_adamw_side else ""
        adamw_side = f"_alr{args.mfsgd_adamw_lr:g}{state}"
    run_dir = Path(args.out) / "runs" / variant.name / f"lr{lr:g}{adamw_side}_seed{seed}"
    record_path = run_dir / "record.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record["status"] != "failed" or not args.retry_failed:
            return record
    if args.report_only:
        return None
    optimizer_keys: dict[str, Any] = {"learning_rate": lr}
    if variant.bench_method == "mofasgd":
        optimizer_keys.update(
            learning_rate_mfsgd=lr,
            learning_rate_adamw=args.mfsgd_adamw_lr,
            mfsgd_adamw_state=args.mfsgd_adamw_state,
            mfsgd_fused_adamw_side=args.mfsgd_fused_adamw_side,
        )
    precision = {"pure_bf16": True, "bf16": False} if variant.precision == "bf16" else {}
    config = method_config(
        variant.bench_method,
        model_dir,
        run_dir,
        variant.rank or 8,
        max_steps=args.steps,
        logging_steps=max(1, args.steps // 10),
        eval_strategy="steps",
        eval_steps=args.steps,
        eval_on_start=True,
        seed=seed,
        profile_memory_from_start=False,
        **variant.overrides,
        **precision,
        **optimizer_keys,
    )
    record = {
        "variant": variant.name,
        "method": variant.method,
        "rank": variant.rank,
        "precision": variant.precision,
        "lr": lr,
        "seed": seed,
        "steps": args.steps,
        "model": model_dir.name,
    }
    if variant.bench_method == "mofasgd":
        record["adamw_lr"] = args.mfsgd_adamw_lr
        if args.mfsgd_adamw_state != "full":
            record["adamw_state"] = args.mfsgd_adamw_state
        if args.mfsgd_fused_adamw_side:
            record["fused_adamw_side"] = True
    start = time.perf_counter()
    try:
        run = run_training(config, timeout=args.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"[sft_quality] {variant.name} lr {lr:g} seed {seed} failed: {str(error)[-600:]}", flush=True)
        record.update(status="failed", eval_loss=None, error=str(error)[-2000:])
    else:
        evals = [e["eval_loss"] for e in run.log_history if "eval_loss" in e]
        final = evals[-1] if evals else None
        finite = final is not None and math.isfinite(final)
        steps = run.timing["steps"]
        cuda = [s["cuda_peak_allocated_bytes"] for s in steps if "cuda_peak_allocated_bytes" in s]
        record.update(
            status="ok" if finite else "diverged",
            eval_loss=final if finite else None,
            base_eval_loss=evals[0] if len(evals) > 1 else None,
            train_loss=last_logged(run.log_history, "loss"),
            step_time_s=median_step_seconds(steps, min(2, len(steps) - 1)),
            peak_rss_mib=run.timing.get("max_rss_kib", 0) / 1024,
            cuda_peak_mib=max(cuda) / 2**20 if cuda else None,
        )
        for key in ("mfsgd/applied_fraction", "mfsgd/update_rms_ratio"):
            value = last_logged(run.log_history, key)
            if value is not None:
                record[key] = value
    record["wall_s"] = round(time.perf_counter() - start, 1)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    loss = "n/a" if record["eval_loss"] is None else f"{record['eval_loss']:.4f}"
    print(f"[sft_quality] {variant.name} lr {lr:g} seed {seed}: eval {loss} ({record['wall_s']} s)", flush=True)
    return record


def sweep_variant(variant: Variant, args: argparse.Namespace, model_dir: Path, deadline: float) -> list[dict]:
    """Grid (extended as needed) at seed 0, then the other seeds at the best rate; stops early at `deadline`
    (and, with ``--report-only``, at the first run that has not been made)."""
    records: list[dict[str, Any]] = []
    results: dict[float, float | None] = {}
    missing = False
    while time.time() < deadline and not missing:
        todo = next_lrs(variant.lr_center, results, args.points, args.max_extend)
        if not todo:
            break
        for lr in todo:
            if time.time() >= deadline:
                break
            record = run_one(variant, lr, 0, args, model_dir)
            if record is None:
                missing = True
                continue
            records.append(record)
            results[lr] = record["eval_loss"]
    lr = best_lr(results)
    if lr is not None and not missing and not next_lrs(variant.lr_center, results, args.points, args.max_extend):
        for seed in range(1, args.seeds):
            if time.time() >= deadline:
                break
            record = run_one(variant, lr, seed, args, model_dir)
            if record is not None:
                records.append(record)
    return records


def base_description(model_dir: Path) -> dict[str, Any]:
    """What the results page says about the base (from the builder's report, when present)."""
    report_path = model_dir / "pretrain_report.json"
    base: dict[str, Any] = {
        "path": str(model_dir.relative_to(REPO)) if model_dir.is_relative_to(REPO) else str(model_dir)
    }
    if report_path.exists():
        report = json.loads(report_path.read_text())
        base.update(
            parameters=report["model"]["parameters"],
            train_tokens_seen=report["corpus"]["train_tokens_seen"],
            val_loss=report["val_loss"],
            unigram=report["baselines"]["unigram"],
        )
    return base


def ensure_pretrained(model_dir: Path, size: str, results_dir: str | None) -> None:
    """Build the pre-trained base of `size` (and its bf16 copy) when missing."""
    if (model_dir / "config.json").exists() and (
        model_dir.with_name(model_dir.name + "-bf16") / "config.json"
    ).exists():
        return
    command = [sys.executable, "-m", "scripts.build_pretrained_llama", "--size", size, "--out", str(model_dir)]
    if results_dir:
        command += ["--results-dir", results_dir]
    subprocess.run(command, check=True, cwd=REPO)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--points", type=int, default=5, help="initial learning rates per variant")
    parser.add_argument("--max-extend", type=int, default=3, help="extra rates beyond the initial grid, per variant")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mfsgd-adamw-lr", type=float, default=1e-3)
    parser.add_argument(
        "--mfsgd-adamw-state", default="full", choices=ADAMW_STATES, help="MoFaSGD's embedding/head optimizer state"
    )
    parser.add_argument(
        "--mfsgd-fused-adamw-side", action="store_true", help="update MoFaSGD's embeddings/head in their hooks"
    )
    parser.add_argument("--base", choices=list(BASES), default="1m", help="pre-trained base size (built if missing)")
    parser.add_argument("--model", default=None, help="base directory (default: the --base size's)")
    parser.add_argument("--out", default=str(REPO / "outputs" / "sft_quality"))
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--budget-min", type=float, default=0, help="stop starting runs after this long (0: none)")
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="write the results of finished runs; run nothing")
    args = parser.parse_args(argv)

    os.environ.setdefault("MFSGD_CPU_PURE_BF16", "1")  # only read when a run sets pure_bf16 (and no CUDA)
    model_dir = Path(args.model or BASES[args.base]).resolve()
    if not args.report_only:
        ensure_pretrained(model_dir, args.base, args.results_dir)
    start = time.perf_counter()
    deadline = time.time() + args.budget_min * 60 if args.budget_min else math.inf
    runs: list[dict[str, Any]] = []
    for name in args.variants:
        variant = VARIANTS[name]
        path = model_dir if variant.precision == "fp32" else model_dir.with_name(model_dir.name + "-bf16")
        runs += sweep_variant(variant, args, path, deadline)
    reference = method_config("adamw", model_dir, Path(args.out), 8)
    result = {
        "setup": {
            "base": {**base_description(model_dir), "page": BASE_PAGES[args.base]},
            "steps": args.steps,
            "points": args.points,
            "max_extend": args.max_extend,
            "seeds": args.seeds,
            "mfsgd_adamw_lr": args.mfsgd_adamw_lr,
            "mfsgd_adamw_state": args.mfsgd_adamw_state,
            "mfsgd_fused_adamw_side": args.mfsgd_fused_adamw_side,
            "batch": f"{reference['per_device_train_batch_size']} x {reference['gradient_accumulation_steps']}",
            "wall_s": round(time.perf_counter() - start, 1),
        },
        "machine": machine_description(),
        "runs": runs,
    }
    write_results(result, Path(args.out), args.results_dir)


def write_results(result: dict[str, Any], out_dir: Path, results_dir: str | None) -> list[Path]:
    """`sft_quality.md` and `.png`, and `sft_quality.json` as the list of runs (setup and machine in each run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js, png = (out_dir / f"sft_quality{ext}" for ext in (".md", ".json", ".png"))
    md.write_text(render_markdown(result))
    shared = {"machine": result["machine"]["device"], "torch": result["machine"]["torch"]}
    js.write_text(json.dumps([{**run, **shared} for run in result["runs"]], indent=2) + "\n")
    (out_dir / "sft_quality_setup.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, png)
    files = [md, js, png]
    if results_dir:
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        for path in files:
            (Path(results_dir) / path.name).write_bytes(path.read_bytes())
    print(md.read_text())
    return files


if __name__ == "__main__":
    main()
