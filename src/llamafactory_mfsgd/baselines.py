"""The authors' baseline keys: GaLore's two learning rates and Muon's momentum, Nesterov and Newton-Schulz steps.

LLaMA-Factory 0.9.5 builds GaLore with one learning rate for every group and Muon with fixed ``momentum=0.95``,
``nesterov=True``, ``ns_steps=5``. Both optimizers read these values from their param groups at every step, so
:func:`apply_baseline_keys` sets them on the groups of the optimizer LLaMA-Factory (or our fused GaLore) built,
before the scheduler records the groups' initial learning rates. Unset keys leave LLaMA-Factory's behaviour as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.optim import Optimizer


@dataclass
class BaselineArguments:
    """Keys of the authors' fork for the GaLore and Muon baselines (and their Fisher pipeline, refused)."""

    galore_lr_galore_params: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the GaLore-projected matrices (default: `learning_rate`)."},
    )
    galore_lr_non_galore_params: float | None = field(
        default=None,
        metadata={"help": "Learning rate of everything GaLore does not project: embeddings, head, norms, biases."},
    )
    muon_momentum: float | None = field(
        default=None, metadata={"help": "Momentum of Muon's internal SGD, in [0, 1) (LLaMA-Factory's default: 0.95)."}
    )
    muon_nesterov: bool | None = field(
        default=None, metadata={"help": "Nesterov momentum in Muon's internal SGD (LLaMA-Factory's default: true)."}
    )
    muon_ns_steps: int | None = field(
        default=None, metadata={"help": "Newton-Schulz iterations of Muon's orthogonalization (default: 5)."}
    )
    use_fisher: bool = field(
        default=False, metadata={"help": "The authors' Fisher-information pipeline: not part of this project."}
    )


GALORE_LR_KEYS = ("galore_lr_galore_params", "galore_lr_non_galore_params")
MUON_KEYS = {"muon_momentum": "momentum", "muon_nesterov": "nesterov", "muon_ns_steps": "ns_steps"}


def validate_baseline_values(args: Any) -> None:
    """Parse-time checks of the baseline keys (called from FinetuningArguments.__post_init__)."""
    if args.use_fisher:
        raise ValueError(
            "`use_fisher: true` (the authors' Fisher-information pipeline) is out of scope for llama-factory-mfsgd."
        )
    for key in GALORE_LR_KEYS:
        value = getattr(args, key)
        if value is not None and not args.use_galore:
            raise ValueError(f"`{key}` sets a GaLore learning rate and needs `use_galore: true`.")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"Invalid `{key}: {value!r}`: expected a learning rate >= 0.")
    for key in MUON_KEYS:
        if getattr(args, key) is not None and not args.use_muon:
            raise ValueError(f"`{key}` configures Muon and needs `use_muon: true`.")
    momentum, nesterov, ns_steps = args.muon_momentum, args.muon_nesterov, args.muon_ns_steps
    if momentum is not None and (isinstance(momentum, bool) or not 0.0 <= momentum < 1.0):
        raise ValueError(f"Invalid `muon_momentum: {momentum!r}`: expected a value in [0, 1).")
    if nesterov is not None and not isinstance(nesterov, bool):
        raise ValueError(f"Invalid `muon_nesterov: {nesterov!r}`: expected true or false.")
    if ns_steps is not None and (isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1):
        raise ValueError(f"Invalid `muon_ns_steps: {ns_steps!r}`: expected an integer >= 1.")


def _all_param_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Param groups of the optimizer, or of every per-parameter optimizer behind layer-wise GaLore's dummy."""
    per_parameter = getattr(optimizer, "optimizer_dict", None)
    if per_parameter:
        return [group for inner in per_parameter.values() for group in inner.param_groups]
    return list(optimizer.param_groups)


def apply_baseline_keys(optimizer: Optimizer | None, finetuning_args: Any) -> Optimizer | None:
    """Set the configured GaLore learning rates / Muon hyperparameters on the groups of `optimizer` (in place)."""
    if optimizer is None:
        return None
    from llamafactory.extras.logging import get_logger

    logger = get_logger("llamafactory.mfsgd")
    galore_lr, other_lr = (getattr(finetuning_args, key, None) for key in GALORE_LR_KEYS)
    if getattr(finetuning_args, "use_galore", False) and (galore_lr is not None or other_lr is not None):
        for group in _all_param_groups(optimizer):
            value = galore_lr if "rank" in group else other_lr  # GaLore marks its projected groups with `rank`
            if value is not None:
                group["lr"] = value
        logger.info_rank0(f"GaLore learning rates: projected matrices {galore_lr}, other parameters {other_lr}.")
    muon = {name: getattr(finetuning_args, key, None) for key, name in MUON_KEYS.items()}
    muon = {name: value for name, value in muon.items() if value is not None}
    if getattr(finetuning_args, "use_muon", False) and muon:
        for group in optimizer.param_groups:
            group.update(muon)
        logger.info_rank0(f"Muon hyperparameters from the config: {muon}.")
    return optimizer
