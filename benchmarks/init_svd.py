"""Start-up cost of `init: weight` (exact economy SVD of every W) vs `weight_randomized` (randomized top-r SVD).

For each LLaMA-3.1-8B matrix shape: wall time of both on this machine, and how good the randomized factors are
(largest principal-angle sine between the exact and randomized top-r left subspaces, relative error of S) on
two stand-ins for a pretrained weight: a Gaussian matrix (flat spectrum, the hardest case) and one with a
power-law spectrum s_i ~ i^-0.5. The 8B total multiplies each shape's time by its count (224 matrices).

    python -m benchmarks.init_svd [--rank 8] [--results-dir results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import REPO, machine_description, save_results
from mofasgd import factor_math as fm

# LLaMA-3.1-8B: 32 layers of q, o (4096 x 4096), k, v (1024 x 4096), gate, up (14336 x 4096), down (4096 x 14336)
LLAMA_8B_SHAPES = {(4096, 4096): 64, (1024, 4096): 64, (14336, 4096): 64, (4096, 14336): 32}


def stand_in(shape: tuple[int, int], kind: str, seed: int = 0) -> torch.Tensor:
    """A Gaussian N(0, 0.02^2) matrix, or one with random singular vectors and singular values s_i ~ i^-0.5."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    if kind == "gaussian":
        return torch.randn(m, n, generator=gen) * 0.02
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
    s = 0.02 * (m * n / k) ** 0.5 * torch.arange(1, k + 1, dtype=torch.float32).pow(-0.5)
    return (u * s) @ v.T


def quality(exact: fm.LowRank, approx: fm.LowRank) -> dict[str, float]:
    cosines = torch.linalg.svdvals(exact.U.T @ approx.U).clamp(max=1.0)
    return {
        "sin_theta": float((1 - cosines.min() ** 2).clamp_min(0).sqrt()),
        "s_rel_error": float(((approx.S - exact.S).abs() / exact.S).max()),
        "captured": float(approx.S.sum() / exact.S.sum()),
    }


def measure(shape: tuple[int, int], rank: int) -> dict[str, Any]:
    row: dict[str, Any] = {"shape": f"{shape[0]}x{shape[1]}", "count": LLAMA_8B_SHAPES.get(shape, 1)}
    for kind in ("gaussian", "power_law"):
        w = stand_in(shape, kind)
        begin = time.perf_counter()
        exact = fm.top_singular_triplets(w, rank)
        exact_s = time.perf_counter() - begin
        begin = time.perf_counter()
        approx = fm.randomized_top_singular_triplets(w, rank, torch.float32)
        randomized_s = time.perf_counter() - begin
        row[kind] = {"exact_s": exact_s, "randomized_s": randomized_s, **quality(exact, approx)}
        print(shape, kind, row[kind], flush=True)
    return row


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Fast start: exact vs randomized top-r SVD of W at initialisation",
        "",
        f"Rank {result['rank']}, fp32. Machine: {m['device']}, torch {m['torch']} ({m['torch_threads']} threads). "
        "Command: `python -m benchmarks.init_svd --results-dir results`.",
        "",
        "| shape | count in 8B | matrix | exact SVD | randomized | speed-up | sin θ (max) | S rel. error | "
        "Σ S captured |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        for kind in ("gaussian", "power_law"):
            q = row[kind]
            lines.append(
                f"| {row['shape']} | {row['count']} | {kind} | {q['exact_s']:.2f} s | {q['randomized_s']:.3f} s | "
                f"{q['exact_s'] / q['randomized_s']:.0f}x | {q['sin_theta']:.3f} | {q['s_rel_error']:.4f} | "
                f"{q['captured']:.4f} |"
            )
    totals = result["totals"]
    lines += [
        "",
        f"LLaMA-3.1-8B (224 matrices), estimated on this machine from the Gaussian rows: exact "
        f"{totals['exact_s'] / 60:.1f} min, randomized {totals['randomized_s']:.0f} s.",
        "",
        "On a flat (Gaussian) spectrum the top-r subspace is barely defined: the randomized factors are another "
        "subspace (sin θ ≈ 1) that still holds ~90 % of the top-r singular mass; on a decaying spectrum they are "
        "close to the exact ones (≥ 99.7 % of the mass). Timings come from a 2-core CPU shared with other jobs, "
        "so they vary between rows. `init: weight` stays the default (the authors' choice); `weight_randomized` "
        "is offered as the fast start until its effect on quality is measured on a pretrained base.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    names = [row["shape"] for row in result["rows"]]
    ax.bar(
        [i - 0.2 for i in range(len(names))], [r["gaussian"]["exact_s"] for r in result["rows"]], 0.4, label="exact"
    )
    ax.bar(
        [i + 0.2 for i in range(len(names))],
        [r["gaussian"]["randomized_s"] for r in result["rows"]],
        0.4,
        label="randomized",
    )
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per matrix")
    ax.legend()
    fig.savefig(path, format="png")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "outputs" / "init_svd"))
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = [measure(shape, args.rank) for shape in LLAMA_8B_SHAPES]
    totals = {key: sum(row["gaussian"][key] * row["count"] for row in rows) for key in ("exact_s", "randomized_s")}
    result = {"machine": machine_description(), "rank": args.rank, "rows": rows, "totals": totals}
    save_results(result, "init_svd", Path(args.out), args.results_dir, render_markdown, plot)


if __name__ == "__main__":
    main()
