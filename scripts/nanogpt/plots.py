"""Loss-curve PNG of one run and the side-by-side PNG of a comparison (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in history if key in r]
    return [s for s, _ in rows], [v for _, v in rows]


def plot_run(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss per step and validation loss at each evaluation."""
    fig, ax = plt.subplots(figsize=(8, 5))
    steps, losses = _series(history, "train_loss")
    ax.plot(steps, losses, lw=0.8, alpha=0.6, label="train")
    steps, losses = _series(history, "val_loss")
    ax.plot(steps, losses, "o-", lw=1.5, ms=3, label="validation")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_comparison(runs: list[dict[str, Any]], path: Path) -> None:
    """Validation curves against tokens, and bars of final validation loss, tokens/s and state bytes.

    Each run is a dict with "label", "history" (the run's log records) and "summary" (its summary.json).
    """
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    curves, val_bars, speed_bars, state_bars = axes.flat
    labels = [run["label"] for run in runs]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        rows = [r for r in run["history"] if "val_loss" in r]
        curves.plot([r["tokens"] for r in rows], [r["val_loss"] for r in rows], "o-", ms=3, color=color)
    curves.set(xlabel="training tokens", ylabel="validation loss", title="Validation loss")
    curves.grid(alpha=0.3)
    curves.legend(labels, fontsize=8)
    finals = [run["summary"]["final_val_loss"] for run in runs]
    val_bars.bar(labels, finals, color=colors)
    val_bars.set_ylim(min(finals) - 0.1 * (max(finals) - min(finals) + 0.1), max(finals) + 0.05)
    val_bars.set(ylabel="final validation loss", title="Final validation loss (lower is better)")
    speed_bars.bar(labels, [run["summary"]["tokens_per_s"] for run in runs], color=colors)
    speed_bars.set(ylabel="tokens / s", title="Training throughput")
    state_bars.bar(labels, [run["summary"]["hidden_state_bytes"] / 2**20 for run in runs], color=colors)
    state_bars.set(ylabel="MiB", title="Optimizer state of the hidden matrices")
    for ax in (val_bars, speed_bars, state_bars):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
