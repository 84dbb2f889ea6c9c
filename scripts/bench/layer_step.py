"""One LLaMA-3.1-8B decoder layer's seven matrices: MoFaSGD's whole per-step cost vs AdamW's, interleaved.

Each repeat runs, for both optimizers on their own copy of the same weights, a backward of sum(W * G) over
all seven matrices (MoFaSGD's fused hooks project each gradient there) and one optimizer step; the table
gives the medians and the ratio. Only public API is used, so the same script measures an older checkout
too (put its ``src`` first on PYTHONPATH) for a before/after comparison of the step engine.

    python scripts/bench/layer_step.py [--rank 8] [--repeats 3] [--scale 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mofasgd
from mofasgd import MoFaSGD

# q, k, v, o, gate, up, down of one LLaMA-3.1-8B layer (out x in)
LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def timed_step(params, grads, optimizer) -> float:
    begin = time.perf_counter()
    sum((p * g).sum() for p, g in zip(params, grads)).backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="divide every dimension by this (quick runs)")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = [(m // args.scale, n // args.scale) for m, n in LAYER]
    weights = [torch.randn(*s) * 0.02 for s in shapes]
    grads = [torch.randn(*s) * 1e-3 for s in shapes]
    mf = [torch.nn.Parameter(w.clone()) for w in weights]
    ad = [torch.nn.Parameter(w.clone()) for w in weights]
    mofasgd_opt = MoFaSGD(mf, lr=1e-5, rank=args.rank, init="gradient")
    adamw = torch.optim.AdamW(ad, lr=1e-5, foreach=False)
    times: dict[str, list[float]] = {"MoFaSGD": [], "AdamW": []}
    for i in range(args.repeats + 1):  # the first repeat builds state
        for name, params, opt in (("MoFaSGD", mf, mofasgd_opt), ("AdamW", ad, adamw)):
            elapsed = timed_step(params, grads, opt)
            if i:
                times[name].append(elapsed)
    mf_s, ad_s = (statistics.median(times[k]) for k in ("MoFaSGD", "AdamW"))
    print(f"mofasgd from {mofasgd.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| shapes | rank | MoFaSGD backward+step | AdamW backward+step | ratio |")
    print("|---|---|---|---|---|")
    print(f"| 8B layer / {args.scale} | {args.rank} | {mf_s * 1e3:.0f} ms | {ad_s * 1e3:.0f} ms | {mf_s / ad_s:.2f} |")


if __name__ == "__main__":
    main()
