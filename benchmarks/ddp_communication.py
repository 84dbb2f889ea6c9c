"""Bytes all-reduced per optimizer step for one LLaMA decoder layer: AdamW + DDP vs data-parallel MoFaSGD.

Two gloo processes train the seven projection matrices and two RMSNorm gains of a LLaMA layer. The
collectives are measured from outside, with no hook into either method: torch.profiler records every
all-reduce the process group runs during the training steps (DDP's gradient buckets and MoFaSGD's average of
its projections alike), with the shapes and dtypes of what it reduced. The measured bytes are checked against
the formulas (AdamW+DDP: every gradient, m n per matrix; MoFaSGD: (m + n) r + 1 per matrix plus the AdamW
parameters' gradients through DDP), which then give the numbers for the real LLaMA-3.1-8B layer width.

    python -m benchmarks.ddp_communication [--hidden 1024 --intermediate 3584 --kv 256 --rank 8]
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile

from benchmarks.llama_layer import LLAMA_8B, LlamaLayerMatrices, layer_matrix_shapes
from llamafactory_mfsgd.launcher import free_port
from mofasgd import MoFaSGD, split_for_mofasgd
from mofasgd.data_parallel import ignore_managed_in_ddp


def expected_bytes(hidden: int, intermediate: int, kv: int, rank: int) -> dict[str, int]:
    """Formula for fp32 bytes all-reduced per step by each method."""
    shapes = layer_matrix_shapes(hidden, intermediate, kv)
    gains = 2 * hidden
    adamw = sum(m * n for m, n in shapes) + gains
    mofasgd = sum((m + n) * min(rank, m, n) + 1 for m, n in shapes) + gains
    return {"adamw_ddp": 4 * adamw, "mofasgd": 4 * mofasgd}


def allreduced_bytes(prof: profile) -> int:
    """Bytes of every tensor the gloo process group all-reduced while `prof` recorded (record_shapes=True)."""
    total = 0
    for event in prof.events():
        if event.name == "gloo:all_reduce":
            for shape, dtype in zip(event.input_shapes, event.input_dtypes):
                total += math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return total


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        counts = {}
        for method in ("adamw_ddp", "mofasgd"):
            torch.manual_seed(0)
            model = LlamaLayerMatrices(args.hidden, args.intermediate, args.kv)
            if method == "mofasgd":
                routing = split_for_mofasgd(model)
                matrices = [p for _, p in routing.mofasgd]
                ignore_managed_in_ddp(model, matrices)
                groups = [{"params": matrices}, {"params": [p for _, p in routing.adamw], "mofasgd": False}]
                optimizer = MoFaSGD(groups, lr=1e-4, rank=args.rank, data_parallel=True)
            else:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ddp = DistributedDataParallel(model)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for step in range(args.steps):
                    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(step + 7 * rank))
                    ddp(x).square().mean().backward()
                    optimizer.step()
                    optimizer.zero_grad()
            counts[method] = allreduced_bytes(prof) // args.steps
        if rank == 0:
            results.update(counts)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--kv", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, free_port(), args, results), nprocs=2, join=True)
        measured = dict(results)
    formula = expected_bytes(args.hidden, args.intermediate, args.kv, args.rank)
    real = expected_bytes(LLAMA_8B["hidden"], LLAMA_8B["intermediate"], LLAMA_8B["kv"], args.rank)
    mib = 2**20
    print(
        f"2 gloo processes, one LLaMA layer (hidden {args.hidden}, MLP {args.intermediate}, kv {args.kv}), "
        f"rank {args.rank}, fp32 gradients/projections"
    )
    print("| layer | method | measured bytes/step | formula bytes/step | ratio AdamW+DDP / MoFaSGD |")
    print("|---|---|---:|---:|---:|")
    size = f"{args.hidden}/{args.intermediate}"
    for method in ("adamw_ddp", "mofasgd"):
        ratio = formula["adamw_ddp"] / formula[method]
        row = f"| {size} | {method} | {measured[method] / mib:.3f} MiB | {formula[method] / mib:.3f} MiB |"
        print(f"{row} {ratio:.0f}x |")
    for method in ("adamw_ddp", "mofasgd"):
        ratio = real["adamw_ddp"] / real[method]
        print(f"| LLaMA-3.1-8B 4096/14336 | {method} | (formula) | {real[method] / mib:.2f} MiB | {ratio:.0f}x |")
    if any(measured[m] != formula[m] for m in formula):
        raise SystemExit(f"measured bytes {measured} differ from the formula {formula}")


if __name__ == "__main__":
    main()
