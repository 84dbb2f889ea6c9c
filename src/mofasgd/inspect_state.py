"""Inspect MoFaSGD's factored momentum in checkpoints: rank, spectrum S, effective rank, momentum norm, S over time.

    mfsgd-inspect-state saves/RUN/checkpoint-600                 # one checkpoint: a table per MoFaSGD matrix
    mfsgd-inspect-state saves/RUN --plot spectrum.png             # every checkpoint-* of a run: S over the steps
    python -m mofasgd.inspect_state CKPT/optimizer.pt --json state.json

Reads ``optimizer.pt`` with ``torch.load(weights_only=True)`` (MoFaSGD's state is tensors only), or an FSDP2
checkpoint's sharded ``optimizer_0/`` (torch.distributed.checkpoint, in this one process: only S, the step and the
param groups are read; U and V only by shape). For each matrix
of a ``"mofasgd": True`` param group the state holds U (m×r), S (r), V (n×r) and the step count; the momentum is
M = U diag(S) Vᵀ, so with orthonormal U, V its Frobenius norm is ‖S‖₂. The effective rank is exp of the entropy
of S/ΣS (Roy & Vetterli, 2007): r when all r directions carry equal weight, 1 when one dominates. Matrix names
come from the ``param_names`` HF Trainer stores in each group; without them a matrix is named by its parameter
name where the state is keyed by names, else by its index.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SHARDED_OPTIMIZER_DIR = "optimizer_0"  # accelerate's sharded (DCP) optimizer checkpoint under FSDP2
_DCP_PREFIX = "optimizer."  # accelerate saves {"optimizer": get_optimizer_state_dict(model, optimizer)}


@dataclass
class MatrixState:
    """The factored momentum of one MoFaSGD matrix at one checkpoint."""

    name: str
    shape: tuple[int, int]
    rank: int
    step: int
    spectrum: list[float]
    effective_rank: float
    momentum_norm: float


def effective_rank(spectrum: torch.Tensor) -> float:
    """exp(entropy of S / ΣS); 0 for an all-zero spectrum."""
    s = spectrum.double().clamp_min(0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def _is_sharded(path: Path) -> bool:
    return (path / ".metadata").is_file()


def optimizer_file(path: str | Path) -> Path:
    """``optimizer.pt`` itself or inside a checkpoint directory, or a checkpoint's sharded ``optimizer_0/`` (FSDP2)."""
    path = Path(path)
    if path.is_file() or _is_sharded(path):
        return path
    for candidate in (path / "optimizer.pt", path / SHARDED_OPTIMIZER_DIR):
        if candidate.is_file() or _is_sharded(candidate):
            return candidate
    raise FileNotFoundError(
        f"No optimizer.pt or sharded {SHARDED_OPTIMIZER_DIR}/ (FSDP2) at {path}: pass a checkpoint directory, "
        f"its optimizer.pt or its {SHARDED_OPTIMIZER_DIR}/."
    )


def _weights_only_planner() -> Any:
    """DCP's load planner, with the non-tensor entries (the param groups) read by torch.load(weights_only=True).

    Unflattened, so that it writes them into the dict passed to ``dcp.load`` (flattening would write into a copy).
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    return WeightsOnlyPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def read_sharded_optimizer(directory: Path) -> dict[str, Any]:
    """What the table needs of a sharded (DCP) optimizer checkpoint, as ``optimizer.pt`` would hold it.

    Read in this process, without torch.distributed: the param groups' ``mofasgd``, ``params`` (parameter names)
    and ``param_names``, and each MoFaSGD matrix's S and step; U and V become meta tensors of their global shape,
    so no factor or AdamW moment is read.

    Raises:
        ValueError: if `directory` is not accelerate's optimizer checkpoint (no ``optimizer.`` entries).
    """
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(directory))
    entries = reader.read_metadata().state_dict_metadata
    if not any(key.startswith(_DCP_PREFIX) for key in entries):
        raise ValueError(f"{directory} is a DCP checkpoint without optimizer state (no `{_DCP_PREFIX}` entries).")
    wanted: dict[str, Any] = {}
    for key, meta in entries.items():
        section, _, rest = key.removeprefix(_DCP_PREFIX).partition(".")
        field = rest.rsplit(".", 1)[-1]
        if section == "param_groups" and field in ("mofasgd", "params", "param_names"):
            wanted[key] = None
        elif section == "state" and field in ("S", "step"):
            wanted[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # reading in one process is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, storage_reader=reader, planner=_weights_only_planner(), no_dist=True)
    groups: dict[int, dict[str, Any]] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, meta in entries.items():
        section, _, rest = key.removeprefix(_DCP_PREFIX).partition(".")
        if section == "param_groups" and key in wanted:
            index, _, field = rest.partition(".")
            groups.setdefault(int(index), {})[field] = wanted[key]
        elif section == "state":
            name, _, field = rest.rpartition(".")
            if key in wanted:
                state.setdefault(name, {})[field] = wanted[key]
            elif field in ("U", "V"):
                state.setdefault(name, {})[field] = torch.empty(meta.size, device="meta")
    return {"state": state, "param_groups": [groups[i] for i in sorted(groups)]}


def read_states(path: str | Path) -> list[MatrixState]:
    """Every MoFaSGD matrix of one checkpoint, in parameter order (each expert of an MoE stack as ``name[e]``).

    Raises:
        ValueError: if the optimizer state has no MoFaSGD group (e.g. an AdamW or GaLore checkpoint).
    """
    file = optimizer_file(path)
    if file.is_dir():
        saved = read_sharded_optimizer(file)
    else:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    groups = [g for g in saved["param_groups"] if g.get("mofasgd")]
    if not groups:
        raise ValueError(f"{optimizer_file(path)} holds no MoFaSGD param group (was this run trained with MoFaSGD?).")
    states = []
    for group in groups:
        # keyed by parameter names (torch.distributed.checkpoint's state dicts) or by index (torch.optim's)
        names = group.get("param_names") or [i if isinstance(i, str) else f"matrix {i}" for i in group["params"]]
        for index, name in zip(group["params"], names):
            state = saved["state"].get(index)
            if not state or "S" not in state:
                continue  # not stepped yet: no factors
            U, S, V = state["U"], state["S"].float(), state["V"]
            matrices = [(name, U, S, V)]
            if S.dim() == 2:  # a stack of E experts: U is E x m x r, S E x r, V E x n x r
                matrices = [(f"{name}[{e}]", U[e], S[e], V[e]) for e in range(S.shape[0])]
            for label, u, spectrum, v in matrices:
                states.append(
                    MatrixState(
                        name=label,
                        shape=(u.shape[0], v.shape[0]),
                        rank=spectrum.numel(),
                        step=int(state["step"]),
                        spectrum=spectrum.tolist(),
                        effective_rank=effective_rank(spectrum),
                        momentum_norm=float(spectrum.norm()),
                    )
                )
    return states


def checkpoint_dirs(path: str | Path) -> list[Path]:
    """A run directory's ``checkpoint-N`` folders in step order, or ``[path]`` for a single checkpoint."""
    path = Path(path)
    found = [p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    if not found:
        return [path]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def format_table(states: list[MatrixState], top: int = 4) -> str:
    """One line per matrix: name, shape, rank, step, the largest singular values, effective rank, ‖M‖."""
    width = max(len(s.name) for s in states)
    header = f"{'matrix':{width}}  {'m x n':>11}  {'r':>3}  {'step':>5}  {'eff. rank':>9}  {'|M|_F':>10}  S (largest)"
    lines = [header, "-" * len(header)]
    for s in states:
        shown = ", ".join(f"{v:.3g}" for v in sorted(s.spectrum, reverse=True)[:top])
        more = ", ..." if s.rank > top else ""
        lines.append(
            f"{s.name:{width}}  {f'{s.shape[0]} x {s.shape[1]}':>11}  {s.rank:>3}  {s.step:>5}  "
            f"{s.effective_rank:>9.2f}  {s.momentum_norm:>10.4g}  [{shown}{more}]"
        )
    return "\n".join(lines)


def plot_evolution(history: list[tuple[int, list[MatrixState]]], out: str | Path, max_matrices: int = 12) -> Path:
    """PNG of each matrix's singular values over the checkpoints (sorted, largest first), plus effective rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [step for step, _ in history]
    names = [s.name for s in history[-1][1]][:max_matrices]
    by_step = [{s.name: s for s in states} for _, states in history]
    columns = 4
    rows = math.ceil((len(names) + 1) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        spectra = [sorted(states[name].spectrum, reverse=True) if name in states else None for states in by_step]
        rank = max(len(s) for s in spectra if s)
        for i in range(rank):
            values = [s[i] if s and s[i] > 0 else float("nan") for s in spectra]  # log axis: zeros left out
            ax.plot(steps, values, marker="o", ms=3, label=f"S{i + 1}")
        ax.set_title(name, fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
    ax = axes.flat[len(names)]
    for name in names:
        ax.plot(steps, [states[name].effective_rank if name in states else float("nan") for states in by_step])
    ax.set_title("effective rank (all shown matrices)", fontsize=8)
    ax.set_xlabel("step", fontsize=8)
    for extra in list(axes.flat)[len(names) + 1 :]:
        extra.axis("off")
    fig.suptitle("MoFaSGD momentum spectrum S per checkpoint")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table of every checkpoint given; optionally plot S over them and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "paths", nargs="+", help="checkpoint directories, optimizer.pt files, FSDP2 optimizer_0/ or run directories"
    )
    parser.add_argument("--plot", help="PNG of S (and effective rank) over the checkpoints")
    parser.add_argument("--max-matrices", type=int, default=12, help="matrices in the plot (default 12)")
    parser.add_argument("--top", type=int, default=4, help="singular values shown per matrix in the table")
    parser.add_argument("--json", help="write every matrix's state summary to this JSON file")
    args = parser.parse_args(argv)

    checkpoints = [ckpt for path in args.paths for ckpt in checkpoint_dirs(path)]
    history = []
    for ckpt in checkpoints:
        states = read_states(ckpt)
        step = max(s.step for s in states)
        history.append((step, states))
        print(f"== {ckpt} (step {step}, {len(states)} MoFaSGD matrices)\n{format_table(states, args.top)}\n")
    history.sort(key=lambda item: item[0])
    if args.plot:
        print(f"spectrum plot: {plot_evolution(history, args.plot, args.max_matrices)}")
    if args.json:
        data = [{"step": step, "matrices": [asdict(s) for s in states]} for step, states in history]
        Path(args.json).write_text(json.dumps(data, indent=1))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
