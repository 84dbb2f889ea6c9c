"""MoFaSGD for LLaMA-Factory: YAML keys, optimizer factory, callbacks, activation in every process.

The YAML keys say ``mfsgd`` (``use_mfsgd``, ``mfsgd_rank``, ...) because they keep the names of the authors'
LLaMA-Factory fork, so their configs run unchanged; the optimizer itself is the ``mofasgd`` package. What is
patched where is listed in :data:`llamafactory_mfsgd.activation.TARGETS`.
"""
