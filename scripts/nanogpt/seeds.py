"""Several seeds of a few optimizers on the same token budget: one table of mean +- std, one PNG.

    python -m scripts.nanogpt.seeds --config-path scripts/nanogpt/cpu.yaml --seeds 3 --results-dir results

A variant is written as for compare.py (`optimizer[:key=value,...]`); each runs once per seed (`train.seed`
0..N-1, which sets the model initialisation and the data order), one after another, into --out-dir; finished
runs (summary.json present) are kept, so an interrupted invocation resumes. The default line-up compares
MoFaSGD rank 32 with GaLore at rank 20 (about the same hidden-matrix state on the CPU model: each run reports
its state bytes) and the full-state AdamW and Muon, with MoFaSGD's beta warm-up and Muon's momentum warm-up
shortened to --warmup steps so that they finish well before the cool-down starts (the base configs' 300
warm-up steps are longer than a CPU run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from scripts.nanogpt import run
from scripts.nanogpt.compare import parse_variant, variant_label
from scripts.nanogpt.config import resolve_path

DEFAULT_VARIANTS = ["mfsgd:rank=32", "galore:rank=20", "adamw", "muon"]
WARMUP_KEYS = {"mfsgd": "beta_warmup_steps", "muon": "momentum_warmup_steps"}


def run_argv(optimizer: str, hidden: dict[str, Any], seed: int, args: argparse.Namespace) -> list[str]:
    """run.py arguments for one (variant, seed): the shared layers, the seed, the warm-up, the variant's keys."""
    shared = json.loads(args.config) if args.config else {}
    hidden = dict(hidden)
    if args.warmup is not None and optimizer in WARMUP_KEYS:
        hidden.setdefault(WARMUP_KEYS[optimizer], args.warmup)
    train = {**shared.get("train", {}), "seed": seed}
    if args.steps is not None:
        train["steps"] = args.steps
    overrides = {**shared, "hidden": {**shared.get("hidden", {}), **hidden}, "train": train, "out_dir": args.out_dir}
    argv = ["--optimizer", optimizer, "--config", json.dumps(overrides)]
    if args.config_path:
        argv += ["--config-path", args.config_path]
    return argv


def aggregate(label: str, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of the final and best validation loss; mean throughput; state bytes."""
    finals = [s["final_val_loss"] for s in summaries]
    bests = [s["best_val_loss"] for s in summaries]
    return {
        "label": label,
        "seeds": len(summaries),
        "final_val_loss_mean": statistics.fmean(finals),
        "final_val_loss_std": statistics.stdev(finals) if len(finals) > 1 else None,
        "best_val_loss_mean": statistics.fmean(bests),
        "final_val_losses": finals,
        "tokens_per_s_mean": statistics.fmean(s["tokens_per_s"] for s in summaries),
        "hidden_state_mib": summaries[0]["hidden_state_bytes"] / 2**20,
        "total_state_mib": summaries[0]["total_state_bytes"] / 2**20,
        "tokens": summaries[0]["tokens"],
        "steps": summaries[0]["steps"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per variant."""
    lines = [
        "| variant | seeds | final val loss (mean ± std) | per seed | tokens/s | hidden-matrix state MiB "
        "| all optimizer state MiB |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        std = "" if row["final_val_loss_std"] is None else f" ± {row['final_val_loss_std']:.4f}"
        per_seed = ", ".join(f"{x:.4f}" for x in row["final_val_losses"])
        lines.append(
            f"| {row['label']} | {row['seeds']} | {row['final_val_loss_mean']:.4f}{std} | {per_seed} "
            f"| {row['tokens_per_s_mean']:,.0f} | {row['hidden_state_mib']:.3f} | {row['total_state_mib']:.3f} |"
        )
    return "\n".join(lines)


def plot(curves: dict[str, list[list[dict[str, Any]]]], path: Path) -> None:
    """Validation loss against tokens: the mean over seeds per variant, with the seeds' min-max band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    ax = fig.subplots()
    for label, histories in curves.items():
        series = [[(r["tokens"], r["val_loss"]) for r in h if "val_loss" in r] for h in histories]
        length = min(len(s) for s in series)
        tokens = [series[0][i][0] for i in range(length)]
        values = [[s[i][1] for s in series] for i in range(length)]
        ax.plot(tokens, [statistics.fmean(v) for v in values], "o-", ms=3, label=f"{label} ({len(series)} seeds)")
        ax.fill_between(tokens, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    ax.set(xlabel="training tokens", ylabel="validation loss (nats/byte)", title="NanoGPT on the offline corpus")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="optimizer[:key=value,...] each")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--config-path", help="YAML layer shared by every run (e.g. scripts/nanogpt/cpu.yaml)")
    parser.add_argument("--config", help="JSON layer shared by every run")
    parser.add_argument("--steps", type=int, help="train.steps for every run")
    parser.add_argument("--warmup", type=int, help="MoFaSGD beta / Muon momentum warm-up steps (default: config's)")
    parser.add_argument("--out-dir", default="outputs/nanogpt/seeds")
    parser.add_argument("--results-dir", help="also write nanogpt_seeds.md/.json/.png here")
    args = parser.parse_args(argv)

    plans = []
    try:
        for text in args.variants:
            optimizer, hidden = parse_variant(text)
            for seed in range(args.seeds):
                argv_ = run_argv(optimizer, hidden, seed, args)
                config = run.resolve(run.parse_args(argv_))
                if args.warmup is not None and optimizer in WARMUP_KEYS:  # the derived name omits this warm-up
                    argv_ += ["--run-name", f"{config.run_name}_hwu{args.warmup}"]
                    config = run.resolve(run.parse_args(argv_))
                plans.append((text, argv_, config.run_dir))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    summaries: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for text, argv_, run_dir in plans:
        if not (run_dir / "summary.json").is_file():
            code = run.main(argv_)
            if code != 0:
                print(f"error: {text} ({run_dir.name}) failed with exit code {code}", file=sys.stderr)
                return code
        label = variant_label(text)
        summaries.setdefault(label, []).append(json.loads((run_dir / "summary.json").read_text()))
        history = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        curves.setdefault(label, []).append(history)

    rows = [aggregate(label, group) for label, group in summaries.items()]
    if len({row["tokens"] for row in rows}) != 1:
        raise RuntimeError("variants trained on different token budgets; compare like with like")
    first = next(iter(summaries.values()))[0]
    heading = (
        f"{first['tokens']:,} training tokens per run ({first['steps']} steps), seeds 0..{args.seeds - 1}, "
        f"{first['world_size']} process(es) on {first['device_name']}; warm-ups: "
        f"{args.warmup if args.warmup is not None else 'as configured'} steps"
    )
    text = f"{heading}\n\n{table(rows)}\n"
    out_dir = resolve_path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir] + ([resolve_path(args.results_dir)] if args.results_dir else [])
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        (target / "nanogpt_seeds.md").write_text(f"# NanoGPT, several seeds\n\n{text}")
        (target / "nanogpt_seeds.json").write_text(json.dumps(rows, indent=2) + "\n")
        plot(curves, target / "nanogpt_seeds.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
