"""Momentum fidelity: how far MoFaSGD's factored momentum U diag(S) V^T drifts from the full-rank momentum.

A plain PyTorch loop trains the tiny LLaMA on the Tulu3-format demo data with MoFaSGD (``fused=False``, so
each managed matrix's gradient G is still in ``p.grad`` when ``step()`` runs). For a few tracked matrices a
full-rank reference is kept beside it with the same beta and the same gradients, in the authors' recursion
(no (1 - beta) factor)::

    M_0 = U_0 diag(S_0) V_0^T      (the optimizer's initial momentum: top-r SVD of W for init="weight",
                                     zero for init="gradient")
    M_t = beta M_{t-1} + G_t

After every step it records the relative error ||M_t - U_t diag(S_t) V_t^T||_F / ||M_t||_F and, as the floor
no rank-r state can beat, the error of the best rank-r approximation of M_t (truncated SVD, Eckart-Young):
sqrt(sum_{i>r} sigma_i^2) / ||M_t||_F. MoFaSGD's gap above that floor comes from projecting each gradient on
the tangent space of the current factors instead of keeping it whole.

    python -m benchmarks.momentum_fidelity [--steps 100] [--ranks 4 8] [--inits weight gradient] \\
        [--out outputs/momentum_fidelity] [--results-dir results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import REPO, save_results
from mofasgd import MoFaSGD, split_for_mofasgd
from mofasgd import factor_math as fm
from scripts.build_tiny_llama import ensure_built

DEFAULT_TRACKED = ("layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.1.mlp.down_proj")


def relative_error(M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> float:
    """||M - U diag(S) V^T||_F / ||M||_F (0 when M is zero and so is the approximation)."""
    M = M.double()
    diff = torch.linalg.matrix_norm(M - (U.double() * S.double()) @ V.double().T)
    norm = torch.linalg.matrix_norm(M)
    return float(diff / norm) if norm > 0 else float(diff)


def best_rank_error(M: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-`rank` approximation of M (norm of its trailing singular values)."""
    sigma = torch.linalg.svdvals(M.double())
    total = sigma.square().sum()
    return float((sigma[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0


def initial_momentum(weight: torch.Tensor, rank: int, init: str) -> torch.Tensor:
    """The momentum MoFaSGD starts from: U diag(S) V^T of the top-r SVD of W ("weight") or zero ("gradient")."""
    if init == "gradient":
        return torch.zeros(weight.shape, dtype=torch.float64)
    factors = fm.top_singular_triplets(weight.detach().float(), fm.effective_rank(rank, weight.shape))
    return ((factors.U * factors.S) @ factors.V.T).double()


def tracked_parameters(model: torch.nn.Module, patterns: list[str]) -> dict[str, torch.nn.Parameter]:
    """Named weight matrices whose module path ends with one of `patterns` (each pattern must match one)."""
    found: dict[str, torch.nn.Parameter] = {}
    for pattern in patterns:
        matches = [(n, p) for n, p in model.named_parameters() if n.removesuffix(".weight").endswith(pattern)]
        if len(matches) != 1:
            raise ValueError(f"pattern {pattern!r} matches {len(matches)} parameters, expected exactly one")
        found[pattern] = matches[0][1]
    return found


def track_fidelity(
    model: torch.nn.Module,
    loss_fn: Any,
    batches: list[Any],
    tracked: dict[str, torch.nn.Parameter],
    rank: int,
    init: str,
    beta: float,
    lr: float,
    adamw_lr: float,
) -> dict[str, Any]:
    """Train `model` with MoFaSGD on `batches` (one step each); per step, loss and each tracked matrix's errors.

    `loss_fn(model, batch)` returns the scalar loss. The routing is `split_for_mofasgd(model)`; every tracked
    matrix must be one MoFaSGD manages.
    """
    routing = split_for_mofasgd(model)
    managed = {id(p) for _, p in routing.mofasgd}
    if any(id(p) not in managed for p in tracked.values()):
        raise ValueError("every tracked matrix must be managed by MoFaSGD")
    optimizer = MoFaSGD(
        [
            {"params": [p for _, p in routing.mofasgd]},
            {"params": [p for _, p in routing.adamw], "mofasgd": False, "lr": adamw_lr},
        ],
        lr=lr,
        rank=rank,
        beta=beta,
        init=init,
        fused=False,
    )
    reference = {name: initial_momentum(p, rank, init) for name, p in tracked.items()}
    history: dict[str, Any] = {"loss": [], "matrices": {name: {"mofasgd": [], "best": []} for name in tracked}}
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        for name, p in tracked.items():
            reference[name].mul_(beta).add_(p.grad.double())
        optimizer.step()
        optimizer.zero_grad()
        history["loss"].append(float(loss.detach()))
        for name, p in tracked.items():
            state = optimizer.state[p]
            errors = history["matrices"][name]
            errors["mofasgd"].append(relative_error(reference[name], state["U"], state["S"], state["V"]))
            errors["best"].append(best_rank_error(reference[name], state["U"].shape[1]))
    return history


def _demo_batches(tokenizer: Any, steps: int, batch_size: int, cutoff: int) -> list[dict[str, torch.Tensor]]:
    """`steps` batches of chat-templated demo conversations (all tokens are targets, padding masked)."""
    rows = [json.loads(line) for line in (REPO / "data" / "tulu3_demo.jsonl").read_text().splitlines() if line]
    sequences = [tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"][:cutoff] for row in rows]
    batches = []
    for step in range(steps):
        chunk = [sequences[(step * batch_size + i) % len(sequences)] for i in range(batch_size)]
        width = max(len(s) for s in chunk)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, seq in enumerate(chunk):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


def _causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (init, rank, matrix): mean and final MoFaSGD error, mean and final best rank-r error."""
    rows = []
    for run in runs:
        for name, errors in run["history"]["matrices"].items():
            rows.append(
                {
                    "init": run["init"],
                    "rank": run["rank"],
                    "matrix": name,
                    "shape": run["shapes"][name],
                    "mofasgd_mean": statistics.fmean(errors["mofasgd"]),
                    "mofasgd_final": errors["mofasgd"][-1],
                    "best_mean": statistics.fmean(errors["best"]),
                    "best_final": errors["best"][-1],
                }
            )
    return rows


def render_markdown(result: dict[str, Any]) -> str:
    """The summary table with the setup and how to read it."""
    setup = result["setup"]
    lines = [
        "# Momentum fidelity: MoFaSGD's factored momentum vs a full-rank reference",
        "",
        f"`{setup['model']}` on tulu3_demo, plain PyTorch loop, {setup['steps']} steps of batch {setup['batch_size']} "
        f"(cutoff {setup['cutoff_len']}), beta {setup['beta']}, lr {setup['lr']} (MoFaSGD) / {setup['adamw_lr']} "
        f"(AdamW side), fused=False. Machine: {result['machine']}.",
        "",
        "Relative error ||M - U diag(S) V^T||_F / ||M||_F against M_t = beta M_(t-1) + G_t (same gradients, same "
        "start), next to the best any rank-r matrix can do (truncated SVD of M_t).",
        "",
        "| init | rank | matrix | shape | MoFaSGD mean | MoFaSGD final | best rank-r mean | best rank-r final |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['init']} | {row['rank']} | {row['matrix']} | {'x'.join(map(str, row['shape']))} "
            f"| {row['mofasgd_mean']:.4f} | {row['mofasgd_final']:.4f} | {row['best_mean']:.4f} "
            f"| {row['best_final']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """One panel per tracked matrix: MoFaSGD's error (solid) and the rank-r floor (dashed) per init and rank."""
    from matplotlib.figure import Figure

    names = list(result["runs"][0]["history"]["matrices"])
    fig = Figure(figsize=(6 * len(names), 4.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for ax, name in zip(axes, names):
        for color, run in zip(colors, result["runs"]):
            errors = run["history"]["matrices"][name]
            steps = range(1, len(errors["mofasgd"]) + 1)
            label = f"init={run['init']}, r={run['rank']}"
            ax.plot(steps, errors["mofasgd"], color=color, label=f"MoFaSGD {label}")
            ax.plot(steps, errors["best"], color=color, linestyle="--", label=f"best rank-r {label}")
        ax.set_title(f"{name} {'x'.join(map(str, result['runs'][0]['shapes'][name]))}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("relative error")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize="x-small")
    fig.suptitle("||M_full - U diag(S) V^T|| / ||M_full||: MoFaSGD (solid) vs best rank-r (dashed)")
    fig.savefig(path, format="png")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-llama"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--inits", nargs="+", default=["weight", "gradient"], choices=["weight", "gradient"])
    parser.add_argument("--tracked", nargs="+", default=list(DEFAULT_TRACKED), help="module-path suffixes")
    parser.add_argument("--beta", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--adamw-lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "outputs" / "momentum_fidelity"))
    parser.add_argument("--results-dir", default=None, help="also copy the results here (e.g. results)")
    args = parser.parse_args(argv)

    import os
    import platform

    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure_built(Path(args.model))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches = _demo_batches(tokenizer, args.steps, args.batch_size, args.cutoff_len)
    runs = []
    start = time.perf_counter()
    for init in args.inits:
        for rank in args.ranks:
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
            tracked = tracked_parameters(model, args.tracked)
            history = track_fidelity(
                model, _causal_lm_loss, batches, tracked, rank, init, args.beta, args.lr, args.adamw_lr
            )
            shapes = {name: list(p.shape) for name, p in tracked.items()}
            runs.append({"init": init, "rank": rank, "shapes": shapes, "history": history})
    result = {
        "setup": {
            "model": Path(args.model).name,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "cutoff_len": args.cutoff_len,
            "beta": args.beta,
            "lr": args.lr,
            "adamw_lr": args.adamw_lr,
            "seed": args.seed,
            "wall_s": round(time.perf_counter() - start, 1),
        },
        "machine": f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}",
        "rows": summarize(runs),
        "runs": runs,
    }
    save_results(result, "momentum_fidelity", Path(args.out), args.results_dir, render_markdown, plot)


if __name__ == "__main__":
    main()
