"""One LLaMA-3.1-8B-shaped decoder layer of nn.Linear modules: forward, backward and step per method, interleaved.

Methods, each on its own copy of the same weights and the same batch:

- ``adamw``: torch's AdamW on every weight (as HF Trainer builds it);
- ``lora``: peft LoRA r8 on the seven projections (frozen base, AdamW on A and B), LLaMA-Factory's LoRA;
- ``mofasgd_hook``: MoFaSGD with every matrix on the post-accumulate-grad hook (``projected_backward=False``);
- ``mofasgd_projected``: MoFaSGD through the projected Linear backward (``opt.attach(model)``): no dW.
- ``mofasgd_compiled``: the projected MoFaSGD with ``rounding_kernel="compiled"`` (bf16: the fused update,
  compiled before the timed steps; fp32 weights never round, so there it equals ``mofasgd_projected``).

The layer is q, k, v, o (grouped-query widths), gate, up, down with a SiLU MLP; attention itself is replaced by an
elementwise mix of q with k + v (its FLOPs are not what is compared). Times are medians over repeats, methods taken
in turns within each repeat so that drift on a shared machine hits them alike.

    python -m benchmarks.linear_layer_step [--tokens 512] [--scale 1] [--rank 8] [--repeats 3]
        [--dtype float32|bfloat16] [--methods adamw,lora,mofasgd_hook,mofasgd_projected,mofasgd_compiled] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mofasgd import MoFaSGD

HIDDEN, KV, FFN = 4096, 1024, 14336
METHODS = ("adamw", "lora", "mofasgd_hook", "mofasgd_projected", "mofasgd_compiled")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DecoderLayerLinears(nn.Module):
    """The seven projections of one LLaMA decoder layer, wired so that each is used once per token."""

    def __init__(self, hidden: int, kv: int, ffn: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, kv, bias=False)
        self.v_proj, self.o_proj = nn.Linear(hidden, kv, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(hidden, ffn, bias=False), nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.groups = hidden // kv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = (self.k_proj(x) + self.v_proj(x)).repeat_interleave(self.groups, dim=-1)
        h = x + self.o_proj(torch.tanh(self.q_proj(x)) * kv)
        return h + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def build(method: str, state: dict[str, torch.Tensor], dims: tuple[int, int, int], dtype, rank: int):
    """(model, optimizer) for one method, from the shared initial weights."""
    model = DecoderLayerLinears(*dims).to(dtype)
    model.load_state_dict(state)
    if method == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJECTIONS)))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # the randomized init: the exact top-r SVD of a 14336 x 4096 matrix takes minutes on a CPU (a one-off cost that
    # both MoFaSGD paths share and the step does not see)
    optimizer = MoFaSGD(
        list(model.parameters()),
        lr=1e-5,
        rank=rank,
        init="weight_randomized",
        projected_backward=method != "mofasgd_hook",
        rounding_kernel="compiled" if method == "mofasgd_compiled" else "eager",
    )
    optimizer.attach(model)
    return model, optimizer


def timed(model, optimizer, x: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float]:
    """(forward, backward, step) seconds of one training step."""
    begin = time.perf_counter()
    loss = F.mse_loss(model(x).float(), target)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad()
    end = time.perf_counter()
    return forward - begin, backward - forward, end - backward


def counted_flops(model, optimizer, x: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """(forward, backward) matrix-product FLOPs of one training step (torch.utils.flop_counter).

    The step is left out: the counter does not see in-place products (``addmm_``), which is what the step runs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward:
        loss = F.mse_loss(model(x).float(), target)
    with backward:
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return forward.get_total_flops(), backward.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--scale", type=int, default=1, help="divide every width by this (1: the real 8B shapes)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    dims = (HIDDEN // args.scale, KV // args.scale, FFN // args.scale)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    torch.manual_seed(0)
    state = {k: v.to(dtype) for k, v in DecoderLayerLinears(*dims).state_dict().items()}
    x = torch.randn(args.tokens, dims[0]).to(dtype)
    target = torch.randn(args.tokens, dims[0])
    built = {method: build(method, state, dims, dtype, args.rank) for method in methods}
    for model, optimizer in built.values():  # warm-up: factor initialisation, optimizer state, allocator
        timed(model, optimizer, x, target)
    flops = {method: counted_flops(*built[method], x, target) for method in methods}
    times = {method: [] for method in methods}
    for _ in range(args.repeats):
        for method in methods:
            times[method].append(timed(*built[method], x, target))
    rows = {}
    for method in methods:
        fwd, bwd, step = (statistics.median(t[i] for t in times[method]) for i in range(3))
        rows[method] = {"forward_ms": fwd * 1e3, "backward_ms": bwd * 1e3, "step_ms": step * 1e3}
        rows[method].update(zip(("forward_gflop", "backward_gflop"), (f / 1e9 for f in flops[method])))
    base = rows.get("adamw")
    print(
        f"One 8B-shaped layer / {args.scale} (widths {dims}), {args.tokens} tokens, {args.dtype}, rank {args.rank}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats} interleaved repeats"
    )
    print(
        "| method | forward ms | backward ms | step ms | backward+step / AdamW | total / AdamW "
        "| GFLOP forward / backward (matrix products) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, row in rows.items():
        bs, total = row["backward_ms"] + row["step_ms"], row["forward_ms"] + row["backward_ms"] + row["step_ms"]
        ratios = ("", "")
        if base:
            base_bs = base["backward_ms"] + base["step_ms"]
            ratios = (f"{bs / base_bs:.2f}", f"{total / (base_bs + base['forward_ms']):.2f}")
        print(
            f"| {method} | {row['forward_ms']:.0f} | {row['backward_ms']:.0f} | {row['step_ms']:.0f} | "
            f"{ratios[0]} | {ratios[1]} | "
            f"{row['forward_gflop']:.2f} / {row['backward_gflop']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
