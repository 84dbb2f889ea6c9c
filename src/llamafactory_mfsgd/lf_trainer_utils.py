"""The patch of LLaMA-Factory's ``train.trainer_utils``: our optimizers and the authors' scheduler kwargs.

``create_custom_optimizer`` builds MoFaSGD (``use_mfsgd``) or fused GaLore (``galore_fused``) and applies the
baselines' keys to the others; ``create_custom_scheduler`` takes the authors' scheduler kwargs. The Trainer patches
(:mod:`.hf_trainer`) and the upstream workarounds (:mod:`.compat`) ride on the same target
(:data:`.activation.TARGETS`).
"""

from __future__ import annotations

from types import ModuleType

from .baselines import apply_baseline_keys
from .compat import require
from .cuda_cache import release_cache_after_gradient_hooks
from .schedulers import wrap_create_custom_scheduler


def patch_trainer_utils(module: ModuleType) -> None:
    """Route `use_mfsgd` / `galore_fused` to our optimizers; scheduler kwargs of the authors' configs."""
    require(module, "create_custom_optimizer", "create_custom_scheduler")
    original = module.create_custom_optimizer

    def create_custom_optimizer(model, training_args, finetuning_args):
        if getattr(finetuning_args, "use_mfsgd", False):
            from .optimizer_factory import create_mfsgd_optimizer

            return release_cache_after_gradient_hooks(create_mfsgd_optimizer(model, training_args, finetuning_args))
        if getattr(finetuning_args, "galore_fused", False):
            from .galore_factory import create_fused_galore_optimizer

            return apply_baseline_keys(
                create_fused_galore_optimizer(model, training_args, finetuning_args), finetuning_args
            )
        return apply_baseline_keys(original(model, training_args, finetuning_args), finetuning_args)

    create_custom_optimizer.__doc__ = original.__doc__
    module.create_custom_optimizer = create_custom_optimizer
    module.create_custom_scheduler = wrap_create_custom_scheduler(module.create_custom_scheduler)
