"""``MFSGD_DEBUG_EMPTY_CACHE=1``: release cached CUDA blocks each time a MoFaSGD gradient is consumed in backward.

The authors' debugging aid for memory profiles (``run.py --enable_mfsgd_debug_empty_cache`` sets it). PyTorch's
caching allocator keeps the blocks of freed gradients reserved; emptying the cache right after each fused-mode
hook has projected and freed a gradient makes the reserved-memory curve follow the allocated one, at a large
cost in speed. Our hook is registered after MoFaSGD's own, and PyTorch runs post-accumulate-grad hooks in
registration order. Without CUDA there is nothing cached to release: the option is a no-op and says so once.
"""

from __future__ import annotations

from typing import Any

import torch

from .activation import env_flag

ENV = "MFSGD_DEBUG_EMPTY_CACHE"


def enabled() -> bool:
    """True when the environment asks for it (``1``, ``true``, ...: :func:`activation.env_flag`)."""
    return env_flag(ENV, default=False)


def _empty_cache(param: torch.Tensor) -> None:
    torch.cuda.empty_cache()


def release_cache_after_gradient_hooks(optimizer: Any) -> Any:
    """With ``MFSGD_DEBUG_EMPTY_CACHE`` set, hook ``torch.cuda.empty_cache`` after each managed matrix's gradient."""
    if not enabled():
        return optimizer
    from llamafactory.extras.logging import get_logger

    logger = get_logger("llamafactory.mfsgd")
    if not torch.cuda.is_available():
        logger.info_rank0(f"{ENV}=1 has no effect here: without CUDA there is no cached memory to release.")
        return optimizer
    managed = [p for group in optimizer.param_groups if group.get("mofasgd") for p in group["params"]]
    for param in managed:
        param.register_post_accumulate_grad_hook(_empty_cache)
    logger.info_rank0(
        f"{ENV}=1: releasing cached CUDA blocks after each of the {len(managed)} MoFaSGD gradient hooks."
    )
    return optimizer
