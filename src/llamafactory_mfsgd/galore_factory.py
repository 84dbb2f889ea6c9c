"""Build the fused GaLore baseline (`use_galore: true` + `galore_fused: true`) with the stock GaLore keys."""

from __future__ import annotations

from typing import Any

from llamafactory.extras.logging import get_logger
from llamafactory.model import find_all_linear_modules
from llamafactory.train import trainer_utils
from torch import nn

from .compat import require

logger = get_logger("llamafactory.mfsgd")


def galore_matrices(model: nn.Module, finetuning_args: Any) -> list[nn.Parameter]:
    """Trainable 2-D weights of the nn.Linear modules named by `galore_target` (LLaMA-Factory's selection rule)."""
    targets = finetuning_args.galore_target
    if targets == ["all"]:
        targets = find_all_linear_modules(model, finetuning_args.freeze_vision_tower)
    return [
        p
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(t in name for t in targets)
        for p in module.parameters()
        if p.requires_grad and p.dim() == 2
    ]


def create_fused_galore_optimizer(model: nn.Module, training_args: Any, finetuning_args: Any):
    """FusedGaLoreAdamW over the same param groups LLaMA-Factory builds for GaLoreAdamW."""
    try:
        from galore_fused import FusedGaLoreAdamW
    except ImportError as err:
        raise ImportError("`galore_fused: true` needs the bundled package: pip install -e galore-torch") from err

    galore = galore_matrices(model, finetuning_args)
    galore_ids = {id(p) for p in galore}
    # stock GaLore's decay rule (LLaMA-Factory's, which decays norm weights), so that the fused baseline's groups
    # stay those of `use_galore` without `galore_fused`
    require(trainer_utils, "_get_decay_parameter_names")
    decay_names = set(trainer_utils._get_decay_parameter_names(model))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in galore_ids:
            (decay if name in decay_names else no_decay).append(p)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": training_args.weight_decay},
        {
            "params": galore,
            "weight_decay": training_args.weight_decay,
            "rank": finetuning_args.galore_rank,
            "update_proj_gap": finetuning_args.galore_update_interval,
            "scale": finetuning_args.galore_scale,
            "proj_type": finetuning_args.galore_proj_type,
        },
    ]
    optimizer = FusedGaLoreAdamW(
        [g for g in groups if g["params"]],
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
    )
    logger.info_rank0(f"Using fused GaLore (rank {finetuning_args.galore_rank}) on {len(galore)} matrices.")
    return optimizer
