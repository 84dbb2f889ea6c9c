"""Quality on the tiny Tulu3-format task: best eval loss per method over a small learning-rate sweep.

Every variant trains the tiny LLaMA through LLaMA-Factory's real SFT path (see ``lf_bench``) with its tiny
YAML, one shared rank and ``--steps`` optimizer steps, once per learning rate, and is evaluated on
``tulu3_demo_eval`` at the end. Variants: AdamW, LoRA, GaLore (the stock optimizer; fused GaLore computes the
same update), and MoFaSGD in both update forms (``mfsgd_use_ones_for_nonzero_s`` false: s_hat = min(1/S,
max_value), the authors' code default; true: s_hat = 1, the paper's spectrally normalised step) and both
initialisations (``mfsgd_init`` weight / gradient). For MoFaSGD the swept rate is used for both
``learning_rate_mfsgd`` and ``learning_rate_adamw`` (embeddings, LM head and norms), as for AdamW and GaLore,
whose single rate covers every parameter too. One seed; differences below the spread of the sweep are noise.

    python -m benchmarks.quality_sweep [--steps 60] [--rank 8] [--results-dir results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, machine_description, save_lr_plot, save_results
from benchmarks.lf_bench import ensure_model, last_logged, method_config, run_training

LR_GRID = (3e-3, 1e-2, 3e-2)
# Variant -> (method of lf_bench.METHODS, YAML overrides, learning-rate keys the swept rate goes to).
VARIANTS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "adamw": ("adamw", {}, ("learning_rate",)),
    "lora": ("lora", {}, ("learning_rate",)),
    "galore": ("galore", {}, ("learning_rate",)),
    **{
        f"mofasgd_{form}_{init}": (
            "mofasgd",
            {"mfsgd_use_ones_for_nonzero_s": form == "ones", "mfsgd_init": init},
            ("learning_rate", "learning_rate_mfsgd", "learning_rate_adamw"),
        )
        for form in ("inv", "ones")
        for init in ("weight", "gradient")
    },
    # LoRA-level memory: the input embeddings and the LM head on MoFaSGD too
    "mofasgd_inv_weight_embhead": (
        "mofasgd",
        {"mfsgd_target": "all,embed_tokens,lm_head"},
        ("learning_rate", "learning_rate_mfsgd", "learning_rate_adamw"),
    ),
}


def best_per_variant(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each variant (in first-seen order) the record with the lowest eval loss; runs without one are skipped."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["eval_loss"] is None:
            continue
        current = best.get(record["variant"])
        if current is None or record["eval_loss"] < current["eval_loss"]:
            best[record["variant"]] = record
    order = list(dict.fromkeys(r["variant"] for r in records))
    return [best[v] for v in order if v in best]


def at_grid_edge(record: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    """Whether the record's learning rate is the smallest or largest tried for its variant."""
    rates = [r["lr"] for r in records if r["variant"] == record["variant"]]
    return record["lr"] in (min(rates), max(rates))


def render_markdown(result: dict[str, Any]) -> str:
    """Best eval loss per variant, then every run."""
    setup = result["setup"]
    records = result["records"]
    lines = [
        "# Quality sweep on the tiny Tulu3-format task",
        "",
        f"`{setup['model']}`, {setup['steps']} steps, batch {setup['batch']}, rank {setup['rank']}, one seed "
        f"({setup['seed']}); learning rates {', '.join(f'{lr:g}' for lr in setup['lr_grid'])}; eval loss on "
        f"tulu3_demo_eval after the last step. Machine: {result['machine']['device']}, torch "
        f"{result['machine']['torch']} ({result['machine'].get('torch_threads', '?')} threads); "
        f"{setup['wall_s']:.0f} s in all.",
        "",
        "## Best eval loss per method",
        "",
        "| method | best lr | eval loss | final train loss | note |",
        "|---|---:|---:|---:|---|",
    ]
    for record in result["best"]:
        note = "best lr at the edge of the grid" if at_grid_edge(record, records) else ""
        lines.append(
            f"| {record['variant']} | {record['lr']:g} | {record['eval_loss']:.4f} "
            f"| {record['train_loss']:.4f} | {note} |"
        )
    lines += ["", "## Every run", "", "| method | lr | eval loss | final train loss |", "|---|---:|---:|---:|"]
    for record in records:
        eval_loss = "n/a" if record["eval_loss"] is None else f"{record['eval_loss']:.4f}"
        train_loss = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
        lines.append(f"| {record['variant']} | {record['lr']:g} | {eval_loss} | {train_loss} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Eval loss against learning rate, one line per variant."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for variant in dict.fromkeys(r["variant"] for r in result["records"]):
        points = sorted((r["lr"], r["eval_loss"]) for r in result["records"] if r["variant"] == variant)
        points = [(lr, loss) for lr, loss in points if loss is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=variant)
    steps, rank = result["setup"]["steps"], result["setup"]["rank"]
    return save_lr_plot(fig, ax, path, f"eval loss after {steps} steps", f"tiny Tulu3 task, rank {rank}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LR_GRID))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "outputs" / "quality_sweep"))
    parser.add_argument("--results-dir", default=None, help="also copy the results here (e.g. results)")
    args = parser.parse_args(argv)

    model_dir = ensure_model("tiny")
    out = Path(args.out)
    records = []
    start = time.perf_counter()
    for variant in args.variants:
        method, overrides, lr_keys = VARIANTS[variant]
        for lr in args.lrs:
            config = method_config(
                method,
                model_dir,
                out / "runs" / f"{variant}_lr{lr:g}",
                args.rank,
                max_steps=args.steps,
                logging_steps=5,
                eval_strategy="steps",
                eval_steps=args.steps,
                seed=args.seed,
                profile_memory_from_start=False,
                **overrides,
                **dict.fromkeys(lr_keys, lr),
            )
            run = run_training(config)
            records.append(
                {
                    "variant": variant,
                    "lr": lr,
                    "eval_loss": last_logged(run.log_history, "eval_loss"),
                    "train_loss": last_logged(run.log_history, "loss"),
                }
            )
    reference = method_config("adamw", model_dir, out, args.rank)
    result = {
        "setup": {
            "model": model_dir.name,
            "steps": args.steps,
            "rank": args.rank,
            "seed": args.seed,
            "lr_grid": args.lrs,
            "batch": f"{reference['per_device_train_batch_size']} x {reference['gradient_accumulation_steps']}",
            "wall_s": round(time.perf_counter() - start, 1),
        },
        "machine": machine_description(),
        "records": records,
        "best": best_per_variant(records),
    }
    save_results(result, "quality_sweep", out, args.results_dir, render_markdown, plot)


if __name__ == "__main__":
    main()
