"""Run several optimizers on the same model and token budget; print one table and draw one PNG.

    python -m scripts.nanogpt.compare --config-path scripts/nanogpt/cpu.yaml          # the default line-up, CPU
    python -m scripts.nanogpt.compare --variants mfsgd:rank=16 galore:rank=16 muon --num-gpus 8

A variant is `optimizer[:key=value,...]`; the keys are that optimizer's `hidden` hyperparameters
(values are read as YAML: 8, 0.001, true). Every variant shares the same layers (--config-path,
--config, --steps), so each sees the same tokens. Runs go one after another, each in its own
process, into --out-dir; the table (Markdown and JSON) and comparison.png are written there too.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from scripts.nanogpt import run
from scripts.nanogpt.config import HIDDEN_DEFAULTS, resolve_path
from scripts.nanogpt.plots import plot_comparison

DEFAULT_VARIANTS = ["mfsgd:rank=8", "mfsgd:rank=32", "galore:rank=8", "galore:rank=32", "adamw", "muon", "sgd"]


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'mfsgd:rank=8,lr=0.001' -> ('mfsgd', {'rank': 8, 'lr': 0.001}); keys are checked later with the config."""
    optimizer, _, rest = text.partition(":")
    if optimizer not in HIDDEN_DEFAULTS:
        raise ValueError(
            f"variant {text!r}: unknown optimizer {optimizer!r} (choose from: {', '.join(HIDDEN_DEFAULTS)})"
        )
    hidden = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {text!r}: expected key=value, got {item!r}")
        hidden[key.strip()] = yaml.safe_load(value)
    return optimizer, hidden


def variant_label(text: str) -> str:
    """Short label for tables and legends: 'mfsgd:rank=8' -> 'mfsgd rank=8'."""
    return text.replace(":", " ").replace(",", " ")


def run_arguments(args: argparse.Namespace, optimizer: str, hidden: dict[str, Any]) -> list[str]:
    """run.py arguments for one variant: the shared layers plus the variant's hidden overrides."""
    shared = json.loads(args.config) if args.config else {}
    if not isinstance(shared, dict):
        raise ValueError(f"--config must be a JSON object, got {shared!r}")
    overrides = {**shared, "hidden": {**shared.get("hidden", {}), **hidden}, "out_dir": args.out_dir}
    argv = ["--optimizer", optimizer, "--config", json.dumps(overrides), "--num-gpus", str(args.num_gpus)]
    if args.config_path:
        argv += ["--config-path", args.config_path]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    return argv


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per variant, in the order given."""
    header = (
        "| variant | final val loss | best val loss | train loss (last 10) | tokens/s | hidden-matrix state MiB "
        "| all optimizer state MiB | peak memory MiB |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        s = row["summary"]
        cells = [row["label"], f"{s['final_val_loss']:.4f}", f"{s['best_val_loss']:.4f}"]
        cells += [f"{s['final_train_loss']:.4f}", f"{s['tokens_per_s']:,.0f}"]
        cells += [f"{s['hidden_state_bytes'] / 2**20:.3f}", f"{s['total_state_bytes'] / 2**20:.3f}"]
        cells += [f"{s['peak_memory_mb']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="optimizer[:key=value,...] each")
    parser.add_argument("--config-path", help="YAML layer shared by every variant (e.g. scripts/nanogpt/cpu.yaml)")
    parser.add_argument("--config", help="JSON layer shared by every variant")
    parser.add_argument("--steps", type=int, help="train.steps for every variant")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--out-dir", default="outputs/nanogpt/compare")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs (summary.json present) as they are")
    args = parser.parse_args(argv)

    plans = []
    try:
        for text in args.variants:
            optimizer, hidden = parse_variant(text)
            run_argv = run_arguments(args, optimizer, hidden)
            plans.append((text, run_argv, run.resolve(run.parse_args(run_argv)).run_dir))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    rows = []
    for text, run_argv, run_dir in plans:
        if not (args.reuse and (run_dir / "summary.json").is_file()):
            code = run.main(run_argv)
            if code != 0:
                print(f"error: variant {text} failed with exit code {code}", file=sys.stderr)
                return code
        summary = json.loads((run_dir / "summary.json").read_text())
        history = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        rows.append({"label": variant_label(text), "summary": summary, "history": history})

    budgets = {row["summary"]["tokens"] for row in rows}
    if len(budgets) != 1:
        raise RuntimeError(f"variants trained on different token budgets {sorted(budgets)}; compare like with like")
    out_dir = resolve_path(args.out_dir)
    first = rows[0]["summary"]
    heading = (
        f"{first['tokens']:,} training tokens per run ({first['steps']} steps), "
        f"{first['world_size']} process(es) on {first['device_name']}"
    )
    text = f"{heading}\n\n{table(rows)}\n"
    (out_dir / "comparison.md").write_text(text)
    (out_dir / "comparison.json").write_text(
        json.dumps([{"label": row["label"], **row["summary"]} for row in rows], indent=2) + "\n"
    )
    plot_comparison(rows, out_dir / "comparison.png")
    print(text)
    print(f"wrote {out_dir / 'comparison.md'}, comparison.json and comparison.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
