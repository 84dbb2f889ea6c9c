"""The project's tools and the NanoGPT comparison, run from the repository root as ``python -m scripts.NAME``.

Tiny and pre-trained LLaMA builders, the CPU demo, the demo and stage data, the Tulu 3 category splitter, the GPU
acceptance run; ``scripts.nanogpt`` is the NanoGPT pre-training comparison (its README.md).
"""
