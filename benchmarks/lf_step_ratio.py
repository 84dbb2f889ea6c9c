"""Train-step time through LLaMA-Factory, methods in turns: rounds of one run per method, medians and ratios.

Each run is ``lf_bench.run_training`` (a fresh interpreter on the real SFT path) of the method's tiny YAML on one
model size; a round runs every method once, in order, so drift on a shared machine hits them alike. The table gives
each method's median over rounds of its median step time (optimizer steps ``--skip``.. of the run), the ratios
to AdamW and to LoRA, the median of the per-round ratios (paired: the two runs of a round are minutes apart) and
the ratio of the best runs (contention only adds time, so each method's fastest run is its least disturbed one).
``--threads 1`` runs every interpreter on one CPU thread: on this 2-vCPU VM a process's speed with two threads is
drawn at its start (runs of one method differ by up to 1.5x, uniformly over their steps) and does not hit the
methods alike; with one thread the spread is smaller and the methods' ranking held in every round measured
(results/projected_backward.md). GEMMs weigh more at one thread, which a ratio of single-thread runs reflects.

    python -m benchmarks.lf_step_ratio [--size small] [--rounds 3] [--steps 40]
        [--methods adamw,lora,mofasgd_hook,mofasgd] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.harness import REPO, machine_description
from benchmarks.lf_bench import MODEL_SIZES, ensure_model, median_step_seconds, method_config, run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(MODEL_SIZES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=2, help="first optimizer steps left out of the median")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", default="adamw,lora,mofasgd_hook,mofasgd")
    parser.add_argument("--out", default=str(REPO / "outputs" / "lf_step_ratio"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    methods = args.methods.split(",")
    model_dir = ensure_model(args.size)
    medians: dict[str, list[float]] = {m: [] for m in methods}
    for round_index in range(args.rounds):
        for method in methods:
            out = Path(args.out) / f"{method}_{round_index}"
            config = method_config(
                method, model_dir, out, args.rank, max_steps=args.steps, eval_strategy="no", logging_steps=10
            )
            config.pop("eval_dataset", None)
            result = run_training(config, threads=args.threads)
            medians[method].append(median_step_seconds(result.timing["steps"], args.skip) * 1e3)
            print(f"round {round_index} {method}: {medians[method][-1]:.1f} ms", flush=True)
    summary = {m: statistics.median(v) for m, v in medians.items()}
    machine = machine_description()
    threads = f"{args.threads} thread(s) per run" if args.threads else "torch's default threads"
    in_turns = f"{args.rounds} rounds in turns"
    print(f"\n{args.size} model, {args.steps} steps, rank {args.rank}, {in_turns}, {threads}; {machine}")
    print(
        "| method | median step (ms) | per round (ms) | x AdamW | x LoRA | paired x AdamW | paired x LoRA "
        "| best x AdamW | best x LoRA |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for method, value in summary.items():
        rounds = ", ".join(f"{v:.1f}" for v in medians[method])
        cells = []
        for base in ("adamw", "lora"):
            cells.append(f"{value / summary[base]:.2f}" if base in summary else "")
        for base in ("adamw", "lora"):
            paired = [a / b for a, b in zip(medians[method], medians.get(base, []))]
            cells.append(f"{statistics.median(paired):.2f}" if paired else "")
        for base in ("adamw", "lora"):
            cells.append(f"{min(medians[method]) / min(medians[base]):.2f}" if base in medians else "")
        print(f"| {method} | {value:.1f} | {rounds} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "machine": machine, "per_round_ms": medians, "median_ms": summary}, f, indent=2
            )


if __name__ == "__main__":
    main()
