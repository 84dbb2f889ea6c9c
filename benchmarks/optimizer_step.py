"""Micro-benchmark: optimizer-state bytes and step time of MoFaSGD vs AdamW on LLaMA-shaped matrices.

Both optimizers run side by side in one process on the same device and matrix, their steps interleaved so
that both see the same machine load. Times are medians over --repeats steps after --warmup steps. For
MoFaSGD two times are given: step() alone, and the gradient projection done in the backward hook plus
step() (the whole per-step optimizer cost, comparable to AdamW's step, which reads the full gradient).

    python -m benchmarks.optimizer_step [--shapes 4096x4096,4096x14336] [--ranks 8,16,32] [--device cpu]
    python -m benchmarks.optimizer_step --projection-forms   # G^T U vs (U^T G)^T, the hook's costly product

Only public API is used: a ``.grad`` set by hand is projected at ``step()`` exactly as the backward hook would
(hook + step), and ``grad_norm()`` projects it beforehand when the step alone is timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

from benchmarks.harness import timed
from memory_profiling import transient_peak_bytes
from mofasgd import MoFaSGD
from mofasgd.memory import optimizer_state_bytes


def bench_pair(shape, rank, dtype, device, warmup, repeats):
    """AdamW and MoFaSGD on the same shape, their steps interleaved so both see the same machine load."""
    adam_w = torch.nn.Parameter(torch.randn(*shape, device=device, dtype=dtype))
    adam = torch.optim.AdamW([adam_w], lr=1e-5, foreach=False)
    adam_w.grad = torch.randn_like(adam_w)
    w = torch.nn.Parameter(adam_w.detach().clone())
    opt = MoFaSGD([w], lr=1e-5, rank=rank, init="gradient", fused=True)
    grad = adam_w.grad.clone()
    adam_times, step_times, total_times = [], [], []
    for i in range(warmup + repeats):
        adam_time = timed(adam.step, device)
        w.grad = grad.clone()
        total = timed(opt.step, device)  # projects the hand-set .grad (the hook's work), then steps
        w.grad = grad.clone()
        opt.grad_norm()  # projects the gradient now, so the next step() is the step alone
        step = timed(opt.step, device)
        if i >= warmup:
            adam_times.append(adam_time)
            step_times.append(step)
            total_times.append(total)
    w.grad = grad.clone()
    opt.grad_norm()
    peak = transient_peak_bytes(opt.step, device)
    adamw = {"state_bytes": optimizer_state_bytes(adam), "step_s": statistics.median(adam_times)}
    mofasgd = {
        "state_bytes": optimizer_state_bytes(opt),
        "step_s": statistics.median(step_times),
        "hook_plus_step_s": statistics.median(total_times),
        "peak_step_bytes": peak,
    }
    return adamw, mofasgd


def projection_forms(shapes: list[tuple[int, int]], ranks: list[int], device: torch.device, repeats: int) -> None:
    """Time the two ways of forming G^T U (best of `repeats`) in fp32 and bf16; print a markdown table."""
    print("| shape | rank | dtype | G^T U | (U^T G)^T | ratio |")
    print("|---|---|---|---|---|---|")
    for m, n in shapes:
        for rank in ranks:
            for dtype in (torch.float32, torch.bfloat16):
                grad = torch.randn(m, n, device=device).to(dtype)
                U = torch.linalg.qr(torch.randn(m, rank, device=device))[0].to(dtype)
                direct = min(timed(lambda g=grad, u=U: g.T @ u, device) for _ in range(repeats + 1))
                outside = min(timed(lambda g=grad, u=U: (u.T @ g).T, device) for _ in range(repeats + 1))
                print(
                    f"| {m}x{n} | {rank} | {str(dtype).split('.')[-1]} | {direct * 1e3:.1f} ms | "
                    f"{outside * 1e3:.1f} ms | {direct / outside:.2f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,4096x14336")
    parser.add_argument("--ranks", default="8,16,32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--projection-forms", action="store_true", help="time the two forms of G^T U instead")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    shapes = [tuple(int(x) for x in text.split("x")) for text in args.shapes.split(",")]
    if args.projection_forms:
        print(f"device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}")
        projection_forms(shapes, [int(r) for r in args.ranks.split(",")], device, args.repeats)
        return

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print(
        f"device: {device} ({machine}), threads: {torch.get_num_threads()}, "
        f"dtype: {args.dtype}, torch {torch.__version__}"
    )
    header = (
        "| shape | rank | AdamW state | MoFaSGD state | state ratio | AdamW step | MoFaSGD step | "
        "MoFaSGD hook+step | (hook+step)/AdamW | MoFaSGD step peak temp |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for shape_text in args.shapes.split(","):
        shape = tuple(int(x) for x in shape_text.split("x"))
        for rank in (int(r) for r in args.ranks.split(",")):
            adam, mf = bench_pair(shape, rank, dtype, device, args.warmup, args.repeats)
            row = {"shape": shape_text, "rank": rank, "adamw": adam, "mofasgd": mf}
            rows.append(row)
            print(
                f"| {shape_text} | {rank} | {adam['state_bytes'] / 2**20:.1f} MiB | "
                f"{mf['state_bytes'] / 2**20:.3f} MiB | {adam['state_bytes'] / mf['state_bytes']:.0f}x | "
                f"{adam['step_s'] * 1e3:.1f} ms | {mf['step_s'] * 1e3:.1f} ms | "
                f"{mf['hook_plus_step_s'] * 1e3:.1f} ms | "
                f"{mf['hook_plus_step_s'] / adam['step_s']:.2f} | {mf['peak_step_bytes'] / 2**20:.2f} MiB |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "machine": machine, "dtype": args.dtype, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
