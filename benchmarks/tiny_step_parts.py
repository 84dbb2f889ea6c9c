"""Where MoFaSGD's extra time goes on the tiny LLaMA's shapes, and its floor there (issue 13's tiny-model target).

The train step of ``configs/mfsgd/tiny_sft_*.yaml`` without the model: the tiny LLaMA's 14 hidden matrices (hidden
64, 2 layers, GQA 4/2, MLP 256) and its 7 AdamW-side tensors, two micro-batches of a cheap stand-in loss, the
optimizer's gradient clipping (MoFaSGD's own, as the extension routes it; torch's for AdamW) and the step. The
optimizers take turns in blocks inside one process, so a drift of this shared CPU hits them alike; the table
gives medians per part. ``--before PATH`` adds MoFaSGD from another checkout's ``src`` (a before/after of the
step engine in the same process).

The floor line is what MoFaSGD cannot avoid at this size whatever its bookkeeping: the solver calls of a step
(batched QR, SVD, Cholesky; timed around each call) and the backward time that bare hooks add, hooks that only
form G V and G^T U and free the gradient. Divided by the step time of the real LLaMA-Factory run
(``--lf-adamw-ms``) it bounds the train-step ratio to AdamW from below.

    python -m benchmarks.tiny_step_parts [--blocks 30] [--before ../old/src] [--lf-adamw-ms 22.5]
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

# the tiny LLaMA's hidden matrices per layer (q, k, v, o, gate, up, down; out x in), 2 layers
LAYER = [(64, 64), (32, 64), (32, 64), (64, 64), (256, 64), (256, 64), (64, 256)]
SIDE = [(512, 64), (512, 64), *[(64,)] * 5]  # embeddings, LM head, norms
PARTS = ("backward x2", "clip", "step", "total")
BLOCK = 20  # calls per turn
WARM_UP_BLOCKS = 2
SOLVERS = (("linalg", "qr"), ("linalg", "svd"), ("linalg", "cholesky_ex"))


def load_mofasgd(src: str):
    """Import the mofasgd package under another checkout's `src`, beside the one this process imports.

    Its modules load under their own names (mofasgd imports itself by absolute names) while any mofasgd modules
    already loaded are set aside; afterwards they are renamed out of the way and the set-aside ones put back.
    """
    package = Path(src) / "mofasgd"
    spec = importlib.util.spec_from_file_location(
        "mofasgd", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    ours = _take_mofasgd_modules()
    module = importlib.util.module_from_spec(spec)
    sys.modules["mofasgd"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for name, loaded in _take_mofasgd_modules().items():
            sys.modules[f"_bench_{src}_{name}"] = loaded
        sys.modules.update(ours)
    return module


def _take_mofasgd_modules() -> dict[str, object]:
    """Remove the loaded mofasgd modules from sys.modules and return them by name."""
    names = [n for n in sys.modules if n == "mofasgd" or n.startswith("mofasgd.")]
    return {name: sys.modules.pop(name) for name in names}


def stand_in_loss(mats: list[torch.Tensor], inputs: dict[tuple[int, ...], torch.Tensor]) -> torch.Tensor:
    """A cheap loss through every hidden matrix: the mean square of a 16-row input times each."""
    return sum((inputs[tuple(p.shape)] @ p.T).square().mean() for p in mats)


def take_turns(runs: dict, blocks: int) -> dict:
    """Median seconds of each part each run reports, the runs taking turns in blocks of BLOCK calls.

    The first WARM_UP_BLOCKS blocks are not counted; turns make a drift of the shared CPU hit every run alike.
    """
    times = {name: collections.defaultdict(list) for name in runs}
    for block in range(blocks):
        for name, run in runs.items():
            for _ in range(BLOCK):
                parts = run()
                if block >= WARM_UP_BLOCKS:
                    for part, seconds in parts.items():
                        times[name][part].append(seconds)
    return {name: {part: statistics.median(v) for part, v in t.items()} for name, t in times.items()}


def setup(optimizer_class):
    """Fresh tensors, the optimizer, its clipping call and a backward over both micro-batch losses."""
    torch.manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(*s) * 0.05) for s in LAYER * 2]
    side = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in SIDE]
    if optimizer_class is None:
        opt = torch.optim.AdamW(mats + side, lr=1e-3)

        def clip():
            torch.nn.utils.clip_grad_norm_(mats + side, 1.0)
    else:
        opt = optimizer_class([{"params": mats}, {"params": side, "mofasgd": False}], lr=1e-3, rank=8)

        def clip():
            opt.clip_grad_norm_(1.0)

    inputs = {s: torch.randn(16, s[1]) for s in set(LAYER)}

    def backward():
        (stand_in_loss(mats, inputs) + sum(p.square().sum() for p in side)).backward()

    return opt, clip, backward


def one_step(opt, clip, backward) -> dict[str, float]:
    t = [time.perf_counter()]
    backward()
    backward()
    t.append(time.perf_counter())
    clip()
    t.append(time.perf_counter())
    opt.step()
    t.append(time.perf_counter())
    opt.zero_grad()
    return {"backward x2": t[1] - t[0], "clip": t[2] - t[1], "step": t[3] - t[2], "total": t[3] - t[0]}


def solver_seconds(optimizer_class, steps: int = 200) -> float:
    """Median per step of the wall time spent inside torch.linalg's qr, svd and cholesky_ex calls."""
    spent = [0.0]
    originals = {name: getattr(torch.linalg, name) for _, name in SOLVERS}

    def timed(fn):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - begin

        return wrapper

    opt, clip, backward = setup(optimizer_class)
    per_step = []
    try:
        for name, fn in originals.items():
            setattr(torch.linalg, name, timed(fn))
        for i in range(steps):
            spent[0] = 0.0
            one_step(opt, clip, backward)
            if i >= 5:
                per_step.append(spent[0])
    finally:
        for name, fn in originals.items():
            setattr(torch.linalg, name, fn)
    return statistics.median(per_step)


def bare_projection_seconds(blocks: int) -> float:
    """Backward time (two micro-batches) that hooks forming only G V and (U^T G)^T, then freeing G, add."""
    torch.manual_seed(0)
    bases = {s: (torch.linalg.qr(torch.randn(s[0], 8))[0], torch.linalg.qr(torch.randn(s[1], 8))[0]) for s in LAYER}

    def project(p: torch.Tensor) -> None:
        U, V = bases[tuple(p.shape)]
        p.grad @ V, (U.T @ p.grad).T  # noqa: B018 - the work itself is what is timed
        p.grad = None

    def backward_of(hooked: bool):
        mats = [torch.nn.Parameter(torch.randn(*s) * 0.05) for s in LAYER * 2]
        for p in mats if hooked else ():
            p.register_post_accumulate_grad_hook(project)
        inputs = {s: torch.randn(16, s[1]) for s in set(LAYER)}

        def backward() -> dict[str, float]:
            begin = time.perf_counter()
            for _ in range(2):
                stand_in_loss(mats, inputs).backward()
            for p in mats:
                p.grad = None
            return {"backward x2": time.perf_counter() - begin}

        return backward

    median = take_turns({"hooked": backward_of(True), "plain": backward_of(False)}, blocks)
    return median["hooked"]["backward x2"] - median["plain"]["backward x2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=30, help=f"turns of {BLOCK} steps ({WARM_UP_BLOCKS} warm-up)")
    parser.add_argument("--before", help="another checkout's src/ whose MoFaSGD is timed too")
    parser.add_argument("--lf-adamw-ms", type=float, default=22.5, help="AdamW's train step through LLaMA-Factory")
    args = parser.parse_args()
    torch.set_num_threads(2)
    optimizers = {"AdamW": None}
    if args.before:
        optimizers["MoFaSGD (before)"] = load_mofasgd(args.before).MoFaSGD
    from mofasgd import MoFaSGD

    optimizers["MoFaSGD"] = MoFaSGD
    runs = {name: functools.partial(one_step, *setup(cls)) for name, cls in optimizers.items()}
    median = {name: {part: s * 1e3 for part, s in m.items()} for name, m in take_turns(runs, args.blocks).items()}
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads; medians in ms")
    print("| optimizer | " + " | ".join(PARTS) + " | extra over AdamW |")
    print("|---|" + "---:|" * (len(PARTS) + 1))
    for name, m in median.items():
        extra = m["total"] - median["AdamW"]["total"]
        print(f"| {name} | " + " | ".join(f"{m[p]:.3f}" for p in PARTS) + f" | {extra:.3f} |")
    solvers = solver_seconds(MoFaSGD) * 1e3
    projections = bare_projection_seconds(args.blocks) * 1e3
    hooks = median["MoFaSGD"]["backward x2"] - median["AdamW"]["backward x2"]
    floor = solvers + projections
    print(
        f"\nMoFaSGD's gradient hooks add {hooks:.3f} ms to two backward passes; bare projecting hooks add "
        f"{projections:.3f} ms.\nfloor: solver calls {solvers:.3f} ms + bare projections {projections:.3f} ms = "
        f"{floor:.3f} ms per step; on a {args.lf_adamw_ms} ms AdamW train step that is a ratio of at least "
        f"{1 + floor / args.lf_adamw_ms:.3f}"
    )


if __name__ == "__main__":
    main()
