"""Build the MoFaSGD optimizer for a LLaMA-Factory run from its finetuning and training arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llamafactory.extras.logging import get_logger
from torch import nn
from transformers import Trainer

from mofasgd import MoFaSGD
from mofasgd.build import build_for_model, hook_path_reason, rank_above_size_message
from mofasgd.integrations.transformers import wrapped_in_ddp

from .arguments import optimizer_options
from .compat import require

logger = get_logger("llamafactory.mfsgd")  # under llamafactory.* so it shares its handler and verbosity


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that take weight decay: the HF Trainer's own rule, as the AdamW baseline's.

    No biases, no norm weights (`input_layernorm`, `model.norm`, Qwen3's `q_norm`/`k_norm`). The Trainer's method
    reads nothing from the trainer, and this factory has none: it is called unbound.
    """
    require(Trainer, "get_decay_parameter_names")
    return set(Trainer.get_decay_parameter_names(None, model))


def _or_default(value: float | None, default: float) -> float:
    return default if value is None else value


def create_mfsgd_optimizer(model: nn.Module, training_args: Any, finetuning_args: Any) -> MoFaSGD:
    """One MoFaSGD optimizer: a MoFaSGD group for the routed matrices, AdamW groups (decay / no decay) for the rest.

    Routing (fork-compatible): every trainable 2-D weight matching ``mfsgd_target`` except the input embeddings,
    the LM head, a reward model's value head (``stage: rm``) and MoE routers, and every MoE expert stack (each
    expert a matrix), goes to MoFaSGD at ``learning_rate_mfsgd``; the rest to AdamW at ``learning_rate_adamw``;
    both default to ``learning_rate``. Under data parallelism the managed matrices are removed from DDP's
    gradient all-reduce and the optimizer averages their thin projections instead (exact, far fewer bytes). Under
    FSDP2 accelerate swaps the sharded DTensors into the param groups after this; the optimizer adopts them.
    """
    lr_mfsgd = _or_default(finetuning_args.learning_rate_mfsgd, training_args.learning_rate)
    lr_adamw = _or_default(finetuning_args.learning_rate_adamw, training_args.learning_rate)
    # FSDP2 reduce-scatters (averages) every gradient itself: the optimizer then works on row shards instead. DDP
    # wraps a single torchrun process too (FORCE_TORCHRUN=1 on one GPU): its reducer must skip the managed matrices
    data_parallel = wrapped_in_ddp(training_args) and finetuning_args.mfsgd_fused and not training_args.fsdp
    # every `mfsgd_<option>` key, then the options the training arguments give (arguments.FROM_TRAINING_ARGUMENTS;
    # weight decay is per group)
    options = optimizer_options(finetuning_args)
    built = build_for_model(
        model,
        lr=lr_mfsgd,
        adamw_lr=lr_adamw,
        weight_decay=training_args.weight_decay,
        decay_names=decay_parameter_names(model),
        target=finetuning_args.mfsgd_target,
        data_parallel=data_parallel,
        sharded=bool(training_args.fsdp),
        accumulation_boundary=_accumulation_boundary() if options["fused_adamw_side"] else None,
        hook_path_reason=hook_path_reason(bool(training_args.fsdp), bool(training_args.torch_compile)),
        key_prefix="mfsgd_",
        **options,
        adam_betas=(training_args.adam_beta1, training_args.adam_beta2),
        adam_eps=training_args.adam_epsilon,
        seed=training_args.seed,
    )
    warning = rank_above_size_message(built.routing.mofasgd, finetuning_args.mfsgd_rank, key_prefix="mfsgd_")
    if warning:
        logger.warning_rank0(warning)
    logger.info_rank0(built.report(finetuning_args.mfsgd_target))
    return built.optimizer


def _accumulation_boundary() -> Callable[[], bool]:
    """Whether the running backward ends an accumulation window (the Trainer marks it in accelerate)."""
    from accelerate.state import GradientState

    gradient_state = GradientState()
    return lambda: gradient_state.sync_gradients
