"""LLaMA-3.1-8B decoder layers' seven matrices each: MoFaSGD's whole per-step cost vs AdamW's, interleaved.

Each repeat runs, for both optimizers on their own copy of the same weights, a backward of sum(W * G) over
all matrices (MoFaSGD's fused hooks project each gradient there) and one optimizer step; the table gives the
medians and the ratio. AdamW is torch's with its defaults (a for-loop on CPU, foreach on CUDA), as HF Trainer
builds it. Only public API is used, so the same script measures an older checkout too (put its ``src`` first
on PYTHONPATH) for a before/after comparison of the step engine.

    python -m benchmarks.layer_step [--rank 8] [--repeats 3] [--scale 1] [--layers 1] [--device cpu]
        [--dtype float32] [--chunk-elements N] [--qr householder|cholesky] [--profile] [--count-syncs] [--ops]
        [--rounding-kernel auto|compiled|eager]

``--ops`` counts the host-side aten ops of one gradient clipping and one step, after two micro-batches, for
MoFaSGD (its own clip_grad_norm_, as the LLaMA-Factory extension routes it) and AdamW (torch's
clip_grad_norm_): on a GPU, where this step is bound by op launches, that count is what the host pays.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import warnings

import torch

import mofasgd
import mofasgd.factor_math
import mofasgd.rounding
from benchmarks.harness import sync
from mofasgd import MoFaSGD

# q, k, v, o, gate, up, down of one LLaMA-3.1-8B layer (out x in)
LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def timed_step(params, grads, optimizer) -> float:
    device = params[0].device
    sync(device)
    begin = time.perf_counter()
    sum((p * g).sum() for p, g in zip(params, grads)).backward()
    optimizer.step()
    optimizer.zero_grad()
    sync(device)
    return time.perf_counter() - begin


def print_profile(name: str, params, grads, optimizer) -> None:
    """One profiled backward+step: host ops launched, device busy time, and the ops that take the most host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if params[0].is_cuda else [])
    with profile(activities=activities) as prof:
        wall = timed_step(params, grads, optimizer)
    averages = prof.key_averages()
    ops = sum(e.count for e in averages if e.key.startswith("aten::"))
    device_ms = sum(e.self_device_time_total for e in averages) / 1e3
    print(f"{name}: {wall * 1e3:.1f} ms wall (profiled), {ops} aten ops, device busy {device_ms:.1f} ms")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12))


def count_syncs(params, grads, optimizer) -> None:
    """CUDA only: the host-device synchronisations of one backward+step, by the Python line that made them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sum((p * g).sum() for p, g in zip(params, grads)).backward()
            optimizer.step()
            optimizer.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(
        f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )
    print(f"{type(optimizer).__name__}: {sum(where.values())} host-device syncs in one backward+step")
    for line, count in where.most_common():
        print(f"  {count:4d}  {line}")


def top_level_ops(fn) -> int:
    """The aten ops `fn` issues from Python (an op called inside another op is not counted again)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def clip_and_step_ops(params, grad_sets, optimizer) -> tuple[int, int]:
    """(ops of clipping, ops of step) on the third step, each after two micro-batches."""
    if hasattr(optimizer, "clip_grad_norm_"):
        clip = lambda: optimizer.clip_grad_norm_(1.0)  # noqa: E731
    else:
        clip = lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)  # noqa: E731
    for step in range(3):
        for micro in range(2):
            sum((p * g).sum() for p, g in zip(params, grad_sets[(step + micro) % 2])).backward()
        counts = top_level_ops(clip), top_level_ops(optimizer.step)
        optimizer.zero_grad()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="divide every dimension by this (quick runs)")
    parser.add_argument("--layers", type=int, default=1, help="layers of seven matrices (matrices per shape)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-elements", type=int, help="stochastic rounding's chunk (default: the library's)")
    parser.add_argument("--qr", choices=["householder", "cholesky"], help="panel QR form (default: the device's)")
    parser.add_argument("--profile", action="store_true", help="also print each optimizer's busiest ops (one step)")
    parser.add_argument("--count-syncs", action="store_true", help="CUDA: also list one step's host-device syncs")
    parser.add_argument("--ops", action="store_true", help="only count the ops of one clipping and one step")
    parser.add_argument("--capturable", action="store_true", help="also MoFaSGD(capturable=True): no host reads")
    parser.add_argument(
        "--rounding-kernel",
        default=mofasgd.DEFAULTS["rounding_kernel"],
        choices=mofasgd.options.ROUNDING_KERNELS,
        help="MoFaSGD's rounding_kernel for bf16 weights (the compiled one compiles in the first, untimed repeat)",
    )
    args = parser.parse_args()
    if args.chunk_elements:
        mofasgd.rounding.CHUNK_ELEMENTS = args.chunk_elements
    if args.qr:  # the devices whose unsharded panels go through CholeskyQR2
        chosen = mofasgd.factor_math.CHOLESKY_QR_DEVICES
        (chosen.add if args.qr == "cholesky" else chosen.discard)(torch.device(args.device).type)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = [(m // args.scale, n // args.scale) for m, n in LAYER] * args.layers
    weights = [(torch.randn(*s, device=device) * 0.02).to(dtype) for s in shapes]
    # two gradient sets, alternated: a gradient repeated every step would lie in the factors' span (G V = U S),
    # an ill-conditioned panel that sends the step down its Householder fallback
    grad_sets = [[(torch.randn(*s, device=device) * 1e-3).to(dtype) for s in shapes] for _ in range(2)]
    mf = [torch.nn.Parameter(w.clone()) for w in weights]
    ad = [torch.nn.Parameter(w.clone()) for w in weights]
    kernel = args.rounding_kernel
    mofasgd_opt = MoFaSGD(mf, lr=1e-5, rank=args.rank, init="gradient", rounding_kernel=kernel)
    adamw = torch.optim.AdamW(ad, lr=1e-5)
    runs = [("MoFaSGD", mf, mofasgd_opt), ("AdamW", ad, adamw)]
    if args.capturable:
        mc = [torch.nn.Parameter(w.clone()) for w in weights]
        runs.insert(
            1,
            (
                "MoFaSGD capturable",
                mc,
                MoFaSGD(mc, lr=1e-5, rank=args.rank, init="gradient", capturable=True, rounding_kernel=kernel),
            ),
        )
    if args.ops:
        qr = sorted(getattr(mofasgd.factor_math, "CHOLESKY_QR_DEVICES", ()))
        print(
            f"mofasgd from {mofasgd.__file__}; unsharded panels through CholeskyQR2 on: {qr or 'no device'}; "
            f"rounding_kernel {kernel}"
        )
        print("| shapes | rank | optimizer | clipping ops | step ops | total |")
        print("|---|---|---|---|---|---|")
        for name, params, opt in runs:
            clip_ops, step_ops = clip_and_step_ops(params, grad_sets, opt)
            print(
                f"| {args.layers} x 8B layer / {args.scale} | {args.rank} | {name} | {clip_ops} | {step_ops} "
                f"| {clip_ops + step_ops} |"
            )
        return
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for i in range(args.repeats + 1):  # the first repeat builds state
        for name, params, opt in runs:
            elapsed = timed_step(params, grad_sets[i % 2], opt)
            if i:
                times[name].append(elapsed)
    mf_s, ad_s = (statistics.median(times[k]) for k in ("MoFaSGD", "AdamW"))
    if args.profile:
        for name, params, opt in (("MoFaSGD", mf, mofasgd_opt), ("AdamW", ad, adamw)):
            print_profile(name, params, grad_sets[(args.repeats + 1) % 2], opt)
    if args.count_syncs:
        if device.type != "cuda":
            print("--count-syncs needs a CUDA device (torch.cuda.set_sync_debug_mode); skipped")
        else:
            for params, opt in ((mf, mofasgd_opt), (ad, adamw)):
                count_syncs(params, grad_sets[args.repeats % 2], opt)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    chunk = mofasgd.rounding.CHUNK_ELEMENTS
    qr = sorted(getattr(mofasgd.factor_math, "CHOLESKY_QR_DEVICES", ()))  # absent before the CholeskyQR2 choice
    print(
        f"mofasgd from {mofasgd.__file__}; torch {torch.__version__}, {where}, {args.dtype}, chunk {chunk}, "
        f"rounding kernel {mofasgd_opt.rounding_kernel.resolved() or 'none used'}"
    )
    print(f"unsharded panels through CholeskyQR2 on: {qr or 'no device'}")
    print("| shapes | rank | MoFaSGD backward+step | AdamW backward+step | ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.layers} x 8B layer / {args.scale} | {args.rank} | {mf_s * 1e3:.1f} ms | {ad_s * 1e3:.1f} ms "
        f"| {mf_s / ad_s:.2f} |"
    )
    if args.capturable:
        mc_s = statistics.median(times["MoFaSGD capturable"])
        print(
            f"MoFaSGD capturable backward+step: {mc_s * 1e3:.1f} ms, "
            f"{mc_s / ad_s:.2f}x AdamW, {mc_s / mf_s:.2f}x eager"
        )


if __name__ == "__main__":
    main()
