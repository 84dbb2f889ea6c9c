"""Switches that run GPU-only paths on CPU processes, for tests and benchmarks on a machine without a GPU.

- ``MFSGD_CPU_PURE_BF16=1``: ``pure_bf16`` passes LLaMA-Factory's device check (bf16 weights without a GPU);
- ``MFSGD_CPU_FSDP2=1``: accelerate applies FSDP2 to CPU processes (gloo), which it otherwise runs as DDP.

Both are off by default, and do nothing where CUDA is available. The parser patch (:mod:`.lf_parser`) applies
them; tests that drive accelerate or transformers directly call them.
"""

from __future__ import annotations

from types import ModuleType

from . import gloo_exit
from .activation import env_flag
from .compat import require

CPU_PURE_BF16_ENV = "MFSGD_CPU_PURE_BF16"
CPU_FSDP2_ENV = "MFSGD_CPU_FSDP2"


def allow_cpu_pure_bf16(module: ModuleType) -> None:
    """With MFSGD_CPU_PURE_BF16=1 and no CUDA, let `pure_bf16` pass LLaMA-Factory's device check.

    The model is then loaded and trained in bf16 on the CPU (no AMP, no fp32 master weights): the same
    weight path as pure_bf16 on a GPU, slower. For tests and benchmarks of bf16 updates without a GPU.
    """
    import torch

    if env_flag(CPU_PURE_BF16_ENV, default=False) and not torch.cuda.is_available():
        require(module, "is_torch_bf16_gpu_available")
        module.is_torch_bf16_gpu_available = lambda: True


def allow_cpu_fsdp2() -> None:
    """With MFSGD_CPU_FSDP2=1 and no CUDA, let accelerate really apply FSDP on CPU processes (gloo).

    accelerate enables FSDP for multi-GPU runs only: on CPU processes it keeps an `fsdp:` config's plugin aside
    and trains with DDP. FSDP2 itself runs on CPU with gloo, so this switch lets tests and CPU benchmarks go
    through the real Trainer/accelerate FSDP2 path (fully_shard, sharded checkpoints) without a GPU.
    """
    import torch

    if not env_flag(CPU_FSDP2_ENV, default=False) or torch.cuda.is_available():
        return
    import accelerate.state as state

    require(state, "AcceleratorState", "DistributedType", "PartialState")
    original = state.AcceleratorState.__init__
    if getattr(original, "__mfsgd_cpu_fsdp2__", False):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type = state.DistributedType.FSDP
            # as accelerate records its own choice: every later AcceleratorState() copies PartialState's type over
            # the shared state, which would turn the run back into MULTI_CPU (then get_state_dict does not gather)
            state.PartialState._shared_state["distributed_type"] = self.distributed_type
            self.fsdp_plugin = plugin
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            gloo_exit.register_drain()  # once however many states are built

    __init__.__mfsgd_cpu_fsdp2__ = True
    state.AcceleratorState.__init__ = __init__
