"""Benchmarks of MoFaSGD against AdamW, LoRA and GaLore: step time, memory, communication, quality.

Each module is one benchmark, run from the repository root as ``python -m benchmarks.NAME`` (its docstring gives
the flags); what they share is in :mod:`benchmarks.harness` (timing, machine, result files), :mod:`benchmarks.lf_bench`
(one timed LLaMA-Factory run) and :mod:`benchmarks.llama_layer` (a LLaMA decoder layer's weights).
"""
