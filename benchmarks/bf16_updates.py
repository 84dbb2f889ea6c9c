"""How much of each update survives bf16 weights: round-to-nearest vs stochastic rounding (issue 10 evidence).

Part 1, one LLaMA-shaped matrix (1024 x 2816, weights N(0, 0.02^2) stored in bf16, the same 40 low-rank-plus-
noise gradients for every run): the bf16 run's weight change projected on the fp32 run's change, as a fraction
of the latter, for MoFaSGD (both step forms, rank 8) and AdamW at three learning rates. 1.0 means the bf16
weights moved as the fp32 ones did; round-to-nearest drops every per-entry change below half an ulp.

Part 2, the tiny SFT through LLaMA-Factory (the tiny LLaMA stored in bf16, as LLaMA-3.1 is on the hub): fp32
training (LLaMA-Factory upcasts trainable weights), pure bf16 with round-to-nearest, pure bf16 with
stochastic rounding; eval loss of each. `pure_bf16` runs on the CPU through ``MFSGD_CPU_PURE_BF16=1`` (the
same bf16 weight path as on a GPU, no AMP, no fp32 master weights).

Part 3, cost: step time of MoFaSGD and AdamW on a bf16 4096 x 4096 matrix with and without stochastic
rounding, interleaved in one process.

    python -m benchmarks.bf16_updates [--results-dir results]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.harness import REPO, machine_description, save_lr_plot, save_results
from benchmarks.lf_bench import ensure_model, last_logged, method_config, run_training
from mofasgd import MoFaSGD

SHAPE = (1024, 2816)
LRS = (1e-5, 1e-4, 1e-3)


def low_rank_gradients(m: int, n: int, steps: int, seed: int = 0):
    """A fixed sequence of gradients: a rank-16 signal with fresh coefficients plus small full-rank noise."""
    gen = torch.Generator().manual_seed(seed)
    left, right = torch.randn(m, 16, generator=gen), torch.randn(16, n, generator=gen)
    for _ in range(steps):
        signal = (left * torch.randn(16, generator=gen)) @ right / math.sqrt(m * n)
        yield signal + 1e-3 * torch.randn(m, n, generator=gen) / math.sqrt(n)


def kept_fraction(shape, steps, lr, stochastic_rounding, make_optimizer, seed=0) -> float:
    """<bf16 change, fp32 change> / ||fp32 change||^2 after `steps` identical gradients from one bf16 start."""
    gen = torch.Generator().manual_seed(seed)
    start = (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)
    w32, w16 = nn.Parameter(start.float()), nn.Parameter(start.clone())
    opt32 = make_optimizer(w32, lr, None)
    opt16 = make_optimizer(w16, lr, stochastic_rounding)
    for g in low_rank_gradients(*shape, steps, seed):
        g16 = g.to(torch.bfloat16)  # both runs see the same (bf16-representable) gradient: only rounding differs
        w32.grad, w16.grad = g16.float(), g16
        opt32.step()
        opt16.step()
        opt32.zero_grad()
        opt16.zero_grad()
    delta32 = (w32.detach() - start.float()).double()
    delta16 = (w16.detach().float() - start.float()).double()
    return float((delta16 * delta32).sum() / delta32.square().sum())


def mofasgd_factory(use_ones: bool):
    """MoFaSGD on one matrix, rank 8, in the given step form."""
    return lambda w, lr, sr: MoFaSGD([w], lr=lr, rank=8, use_ones_for_nonzero_s=use_ones, stochastic_rounding=sr)


def adamw_factory(w, lr, sr):
    """MoFaSGD's AdamW side on one tensor (torch's AdamW semantics)."""
    return MoFaSGD([{"params": [w], "mofasgd": False}], lr=lr, stochastic_rounding=sr)


OPTIMIZERS = {
    "MoFaSGD s_hat=1": mofasgd_factory(True),
    "MoFaSGD s_hat=1/S": mofasgd_factory(False),
    "AdamW side": adamw_factory,
}


def matrix_table(steps: int, seeds: int) -> list[dict[str, Any]]:
    """Kept fractions per optimizer and lr: round-to-nearest (deterministic) and stochastic (mean, std over seeds)."""
    rows = []
    for name, factory in OPTIMIZERS.items():
        for lr in LRS:
            nearest = kept_fraction(SHAPE, steps, lr, False, factory)
            draws = [kept_fraction(SHAPE, steps, lr, None, factory, seed=seed) for seed in range(seeds)]
            std = statistics.stdev(draws) if len(draws) > 1 else 0.0
            rows.append(
                {"optimizer": name, "lr": lr, "nearest": nearest, "stochastic": statistics.mean(draws), "std": std}
            )
            print(f"{name:18s} lr {lr:g}: nearest {nearest:.4f}, stochastic {rows[-1]['stochastic']:.4f}", flush=True)
    return rows


def step_times(repeats: int) -> dict[str, float]:
    """Median step time (ms) with round-to-nearest and stochastic rounding, interleaved on one bf16 4096^2 matrix."""
    torch.manual_seed(0)
    times: dict[str, list[float]] = {}
    setups = {}
    for name, factory in (("MoFaSGD", mofasgd_factory(True)), ("AdamW side", adamw_factory)):
        for sr in (False, True):
            w = nn.Parameter((torch.randn(4096, 4096) * 0.02).to(torch.bfloat16))
            setups[(name, sr)] = (w, factory(w, 1e-5, sr), torch.randn(4096, 4096).to(torch.bfloat16))
    for _ in range(repeats + 1):
        for key, (w, opt, g) in setups.items():
            w.grad = g.clone()
            begin = time.perf_counter()
            opt.step()
            times.setdefault(f"{key[0]} {'stochastic' if key[1] else 'nearest'}", []).append(
                (time.perf_counter() - begin) * 1e3
            )
            opt.zero_grad()
    return {k: statistics.median(v[1:]) for k, v in times.items()}  # the first step builds state


def sft_runs(steps: int, lrs: list[float]) -> list[dict[str, Any]]:
    os.environ["MFSGD_CPU_PURE_BF16"] = "1"
    model_dir = ensure_model("tiny-bf16")
    variants = {
        "fp32 (upcast)": {},
        "pure bf16, nearest": {"pure_bf16": True, "mfsgd_stochastic_rounding": False},
        "pure bf16, stochastic": {"pure_bf16": True},
    }
    records = []
    for lr in lrs:
        for name, overrides in variants.items():
            slug = name.replace(" ", "").replace(",", "_").replace("(", "").replace(")", "")
            config = method_config(
                "mofasgd",
                model_dir,
                REPO / "outputs" / "bf16_updates" / f"{slug}_lr{lr:g}",
                8,
                max_steps=steps,
                logging_steps=10,
                eval_strategy="steps",
                eval_steps=steps,
                learning_rate=lr,
                learning_rate_mfsgd=lr,
                learning_rate_adamw=lr,
                profile_memory_from_start=False,
                **overrides,
            )
            run = run_training(config)
            applied = [e["mfsgd/applied_fraction"] for e in run.log_history if "mfsgd/applied_fraction" in e]
            records.append(
                {
                    "variant": name,
                    "lr": lr,
                    "eval_loss": last_logged(run.log_history, "eval_loss"),
                    "applied_fraction_mean": statistics.mean(applied) if applied else None,
                }
            )
            print(records[-1], flush=True)
    return records


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# bf16 weights: how much of each update survives",
        "",
        f"Machine: {m['device']}, torch {m['torch']} ({m['torch_threads']} threads). Command: "
        "`make bench-bf16` (`python -m benchmarks.bf16_updates --results-dir results`).",
        "",
        f"## One {SHAPE[0]} x {SHAPE[1]} matrix, {result['matrix_steps']} steps",
        "",
        "Fraction of the fp32 run's update kept by the bf16 run (projection on the fp32 change; 1 = all of it). "
        f"Stochastic rounding: mean ± std over {result['matrix_seeds']} seeds (the spread is the rounding noise's "
        "component along the update; its mean is 1).",
        "",
        "| optimizer | lr | round-to-nearest | stochastic rounding |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['optimizer']} | {r['lr']:g} | {r['nearest']:.4f} | {r['stochastic']:.3f} ± {r['std']:.3f} |"
        for r in result["matrix"]
    ]
    lines += [
        "",
        f"## Tiny SFT through LLaMA-Factory ({result['sft_steps']} steps, MoFaSGD rank 8, tiny LLaMA stored in bf16)",
        "",
        "| lr | training | eval loss | vs fp32 | mean mfsgd/applied_fraction |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in result["sft"]:
        ref = next(x for x in result["sft"] if x["lr"] == r["lr"] and x["variant"].startswith("fp32"))
        rel = f"{100 * (r['eval_loss'] / ref['eval_loss'] - 1):+.2f} %"
        applied = "n/a" if r["applied_fraction_mean"] is None else f"{r['applied_fraction_mean']:.3f}"
        lines.append(f"| {r['lr']:g} | {r['variant']} | {r['eval_loss']:.4f} | {rel} | {applied} |")
    t = result["step_ms"]
    lines += [
        "",
        "## Cost of stochastic rounding (bf16 4096 x 4096, median step time, interleaved)",
        "",
        "| optimizer | nearest | stochastic | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name in ("MoFaSGD", "AdamW side"):
        a, b = t[f"{name} nearest"], t[f"{name} stochastic"]
        lines.append(f"| {name} | {a:.1f} ms | {b:.1f} ms | {b / a:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for name in OPTIMIZERS:
        rows = [r for r in result["matrix"] if r["optimizer"] == name]
        ax.plot([r["lr"] for r in rows], [r["nearest"] for r in rows], marker="o", ls="--", label=f"{name}, nearest")
        ax.plot([r["lr"] for r in rows], [r["stochastic"] for r in rows], marker="s", label=f"{name}, stochastic")
    title = f"bf16 weights, {SHAPE[0]} x {SHAPE[1]} matrix"
    return save_lr_plot(fig, ax, path, "fraction of the fp32 update kept", title)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix-steps", type=int, default=40)
    parser.add_argument("--matrix-seeds", type=int, default=3)
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--sft-lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "outputs" / "bf16_updates"))
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    result = {
        "machine": machine_description(),
        "matrix_steps": args.matrix_steps,
        "matrix_seeds": args.matrix_seeds,
        "matrix": matrix_table(args.matrix_steps, args.matrix_seeds),
        "step_ms": step_times(args.timing_repeats),
        "sft_steps": args.sft_steps,
        "sft": sft_runs(args.sft_steps, args.sft_lrs),
    }
    save_results(result, "bf16_updates", Path(args.out), args.results_dir, render_markdown, plot)


if __name__ == "__main__":
    main()
