"""MoFaSGD for LLaMA-Factory: YAML keys, optimizer factory, callbacks, activation in every process."""
