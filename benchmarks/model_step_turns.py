"""Train-step time of the LLaMA-Factory benchmark models in one process, the methods taking turns step by step.

Whole-run timings through LLaMA-Factory (``lf_step_ratio.py``) swing by tens of percent on a shared CPU; here every
method trains its own copy of the same random LLaMA (``lf_bench.MODEL_SIZES`` shapes: tiny = hidden 64, 2 layers;
small = hidden 256, 4 layers) with LLaMA-Factory's defaults that matter for speed (reentrant gradient
checkpointing, 2 micro-batches of 4 x 64 tokens, clipping at 1.0), and the methods alternate at every optimizer
step, so drift hits them alike. Methods: AdamW (torch's), LoRA r8 on the seven projections (peft, as
LLaMA-Factory builds it), MoFaSGD on the gradient-hook path, MoFaSGD with the projected Linear backward.
``--before SRC`` adds ``mofasgd_before``: the projected MoFaSGD of another checkout's ``src``, in the same process
(a before/after of a code change that the per-process speed of a shared machine cannot blur).

    python -m benchmarks.model_step_turns [--size small] [--steps 30] [--tokens 64] [--rank 8] [--before SRC]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mofasgd

SIZES = {"tiny": (64, 256, 2), "small": (256, 688, 4)}  # hidden, intermediate, layers (benchmarks/lf_bench.py)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model(size: str) -> LlamaForCausalLM:
    hidden, intermediate, layers = SIZES[size]
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    torch.manual_seed(0)
    net = LlamaForCausalLM(config)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    net.enable_input_require_grads()
    return net.train()


def build(method: str, size: str, rank: int, before: Any = None):
    """(model, optimizer, parameters to clip with torch's clip_grad_norm_ or None for MoFaSGD's own).

    `before`: the mofasgd package of another checkout (:func:`benchmarks.tiny_step_parts.load_mofasgd`), which
    builds ``mofasgd_before``.
    """
    net = model(size)
    if method == "adamw":
        return net, torch.optim.AdamW(net.parameters(), lr=1e-4), list(net.parameters())
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS))
        trainable = [p for p in net.parameters() if p.requires_grad]
        return net, torch.optim.AdamW(trainable, lr=1e-4), trainable
    package = before if method == "mofasgd_before" else mofasgd
    routing = package.split_for_mofasgd(net)
    groups = [{"params": [p for _, p in routing.mofasgd]}, {"params": [p for _, p in routing.adamw], "mofasgd": False}]
    optimizer = package.MoFaSGD(groups, lr=1e-4, rank=rank, projected_backward=method != "mofasgd_hook")
    optimizer.attach(net)
    return net, optimizer, None


def one_step(net, optimizer, clip, batches) -> float:
    begin = time.perf_counter()
    for tokens in batches:
        net(input_ids=tokens, labels=tokens).loss.backward()
    if clip is None:
        optimizer.clip_grad_norm_(1.0)
    else:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64, help="sequence length; 4 sequences per micro-batch")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", default="adamw,lora,mofasgd_hook,mofasgd")
    parser.add_argument("--before", help="another checkout's src/: adds mofasgd_before (its projected MoFaSGD)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    before = None
    if args.before:
        from benchmarks.tiny_step_parts import load_mofasgd

        before = load_mofasgd(args.before)
        methods.append("mofasgd_before")
    built = {method: build(method, args.size, args.rank, before) for method in methods}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1024, (4, args.tokens), generator=gen) for _ in range(2)]
    for entry in built.values():  # warm-up: factors, optimizer state, allocator
        for _ in range(2):
            one_step(*entry, batches)
    times = {method: [] for method in methods}
    for _ in range(args.steps):
        for method in methods:
            times[method].append(one_step(*built[method], batches))
    medians = {method: statistics.median(values) * 1e3 for method, values in times.items()}
    print(
        f"{args.size} model, 2 x 4 x {args.tokens} tokens a step, rank {args.rank}, reentrant checkpointing, "
        f"{args.steps} steps per method in turns, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| method | median step (ms) | x AdamW | x LoRA |")
    print("|---|---:|---:|---:|")
    for method, value in medians.items():
        vs_adamw = f"{value / medians['adamw']:.2f}" if "adamw" in medians else ""
        vs_lora = f"{value / medians['lora']:.2f}" if "lora" in medians else ""
        print(f"| {method} | {value:.1f} | {vs_adamw} | {vs_lora} |")


if __name__ == "__main__":
    main()
