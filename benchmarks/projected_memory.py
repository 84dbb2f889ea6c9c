"""Backward's transient memory on a LLaMA with LLaMA-3.1-8B's proportions: MoFaSGD's hook path vs projected path.

The model (2 layers, hidden 128 or ``--hidden``, ffn 3.5 x hidden, 4 query heads per kv head, random weights) runs
one step first (factors made), then one more forward; the table gives the backward's transient peak (CPU profiler
allocation events, memory_profiling.transient_peak_bytes) and the largest single allocation in it, against the
largest managed matrix's fp32 bytes. On the hook path the m x n gradients pass through backward; on the projected
path no weight-sized tensor is formed.

    python -m benchmarks.projected_memory [--hidden 128] [--tokens 96] [--rank 8]
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memory_profiling import transient_peak_bytes
from mofasgd import MoFaSGD, split_for_mofasgd


class BackwardMemory(NamedTuple):
    """One backward's allocations: their sizes, the transient peak, and the largest managed matrix (bytes)."""

    sizes: list[int]
    peak: int
    largest_matrix: int


def llama_8b_proportions(hidden: int, tokens: int) -> LlamaForCausalLM:
    """A 2-layer random LLaMA with LLaMA-3.1-8B's proportions (ffn 3.5 x hidden, 4 query heads per kv head)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=hidden * 7 // 2,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=max(64, tokens),
    )
    return LlamaForCausalLM(config)


def backward_allocations(projected: bool, hidden: int, tokens: int, rank: int) -> BackwardMemory:
    """The second backward's allocations (the first step makes the factors), on one path."""
    model = llama_8b_proportions(hidden, tokens)
    routing = split_for_mofasgd(model)
    groups = [{"params": [p for _, p in routing.mofasgd]}, {"params": [p for _, p in routing.adamw], "mofasgd": False}]
    opt = MoFaSGD(groups, lr=1e-3, rank=rank, projected_backward=projected)
    opt.attach(model)
    batch = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    model(batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad()
    loss = model(batch, labels=batch).loss
    with torch.profiler.profile(profile_memory=True) as prof:
        loss.backward(retain_graph=True)
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]
    opt.zero_grad()
    peak = transient_peak_bytes(lambda: loss.backward())
    return BackwardMemory(sizes, peak, max(p.numel() * 4 for _, p in routing.mofasgd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    print(f"LLaMA-3.1-8B proportions at hidden {args.hidden}, 2 layers, {args.tokens} tokens, rank {args.rank}, fp32")
    print("| path | backward transient peak (KiB) | largest allocation (KiB) | largest managed matrix (KiB) |")
    print("|---|---:|---:|---:|")
    for name, projected in (("hook", False), ("projected", True)):
        memory = backward_allocations(projected, args.hidden, args.tokens, args.rank)
        largest = max(memory.sizes)
        print(f"| {name} | {memory.peak / 1024:.0f} | {largest / 1024:.0f} | {memory.largest_matrix / 1024:.0f} |")


if __name__ == "__main__":
    main()
