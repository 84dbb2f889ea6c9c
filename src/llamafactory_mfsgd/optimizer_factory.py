"""Build the MoFaSGD optimizer for a LLaMA-Factory run from its finetuning and training arguments."""

from __future__ import annotations

from typing import Any

from llamafactory.extras.logging import get_logger
from torch import nn
from transformers import Trainer

from mofasgd import MoFaSGD, split_for_mofasgd
from mofasgd.data_parallel import ignore_managed_in_ddp

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


def _warn_rank_above_matrix_size(matrices: list[tuple[str, nn.Parameter]], rank: int) -> None:
    """Warn, naming them by shape, about the matrices whose smaller side is below `mfsgd_rank` (they keep min(m, n)).

    A warning, not an error: such a matrix trains correctly (its momentum is exact, full rank), one rank serves the
    whole model, and small matrices (GQA k/v projections, routers) may sit below a rank that suits the others.
    """
    clamped: dict[tuple[int, int], list[str]] = {}
    for name, p in matrices:
        if rank > min(p.shape[-2:]):  # a stack of experts: the size of each expert's matrix
            clamped.setdefault(tuple(p.shape[-2:]), []).append(name)
    if not clamped:
        return
    shapes = "; ".join(
        f"{len(names)} of shape {m}x{n} (e.g. `{names[0]}`) keep rank {min(m, n)}" for (m, n), names in clamped.items()
    )
    count = sum(len(names) for names in clamped.values())
    logger.warning_rank0(
        f"`mfsgd_rank: {rank}` is above the size of {count} of the {len(matrices)} MoFaSGD matrices, which keep rank "
        f"min(m, n) instead (rank {rank} -> min(m, n)): {shapes}. Their momentum is then exact but not compact: "
        "(m + n + 1) * r factor numbers, more than the m * n of the matrix. Lower `mfsgd_rank`, or leave them out of "
        "`mfsgd_target`."
    )


def create_mfsgd_optimizer(model: nn.Module, training_args: Any, finetuning_args: Any) -> MoFaSGD:
    """One MoFaSGD optimizer: a MoFaSGD group for the routed matrices, AdamW groups (decay / no decay) for the rest.

    Routing (fork-compatible): every trainable 2-D weight matching ``mfsgd_target`` except the input embeddings,
    the LM head, a reward model's value head (``stage: rm``) and MoE routers, and every MoE expert stack (each
    expert a matrix), goes to MoFaSGD at ``learning_rate_mfsgd``; the rest to AdamW at ``learning_rate_adamw``;
    both default to ``learning_rate``. Under data parallelism the managed matrices are removed from DDP's
    gradient all-reduce and the optimizer averages their thin projections instead (exact, far fewer bytes). Under
    FSDP2 accelerate swaps the sharded DTensors into the param groups after this; the optimizer adopts them.
    """
    routing = split_for_mofasgd(model, finetuning_args.mfsgd_target)
    if not routing.mofasgd:
        raise ValueError(
            f"`mfsgd_target: {finetuning_args.mfsgd_target}` matches no trainable 2-D weight of this model; "
            "use `all` or module names such as `q_proj,v_proj,mlp`."
        )
    experts = [name for name, p in routing.mofasgd if p.dim() == 3]
    if experts and training_args.fsdp:
        raise ValueError(
            f"FSDP2 would shard the MoE expert stacks ({len(experts)} tensors, e.g. `{experts[0]}`), which MoFaSGD "
            "steps only unsharded: set `mfsgd_target` to the modules without `experts` (e.g. "
            "`q_proj,k_proj,v_proj,o_proj`; the experts then train with AdamW), or train with DDP (no `fsdp`)."
        )
    _warn_rank_above_matrix_size(routing.mofasgd, finetuning_args.mfsgd_rank)
    lr_mfsgd = _or_default(finetuning_args.learning_rate_mfsgd, training_args.learning_rate)
    lr_adamw = _or_default(finetuning_args.learning_rate_adamw, training_args.learning_rate)
    decay_names = decay_parameter_names(model)
    # (name, parameter) pairs: torch keeps the names in the param groups, so MoFaSGD's errors name the matrix
    groups = [{"params": list(routing.mofasgd), "lr": lr_mfsgd, "weight_decay": training_args.weight_decay}]
    decay = [(n, p) for n, p in routing.adamw if n in decay_names]
    no_decay = [(n, p) for n, p in routing.adamw if n not in decay_names]
    for params, weight_decay in ((decay, training_args.weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": params, "mofasgd": False, "lr": lr_adamw, "weight_decay": weight_decay})

    # FSDP2 reduce-scatters (averages) every gradient itself: the optimizer then works on row shards instead
    data_parallel = training_args.world_size > 1 and finetuning_args.mfsgd_fused and not training_args.fsdp
    # every `mfsgd_<option>` key, then the options the training arguments give (arguments.FROM_TRAINING_ARGUMENTS;
    # weight decay is per group above)
    optimizer = MoFaSGD(
        groups,
        **optimizer_options(finetuning_args),
        lr=lr_mfsgd,
        adam_betas=(training_args.adam_beta1, training_args.adam_beta2),
        adam_eps=training_args.adam_epsilon,
        data_parallel=data_parallel,
        seed=training_args.seed,
    )
    if data_parallel:  # the optimizer averages these itself: the managed matrices' projections, and with the fused
        # AdamW side its matrices' gradients (in their hooks)
        fused_side = [p for _, p in routing.adamw if p.dim() == 2] if optimizer.fused_adamw_side else []
        ignore_managed_in_ddp(model, [p for _, p in routing.mofasgd] + fused_side)
    if optimizer.fused_adamw_side:  # the Trainer marks the last micro-batch of each accumulation window here
        from accelerate.state import GradientState

        gradient_state = GradientState()
        optimizer.accumulation_boundary = lambda: gradient_state.sync_gradients
    attachment = optimizer.attach(model, reason=_hook_path_reason(training_args))
    logger.info_rank0(
        f"{effective_settings(optimizer, finetuning_args.mfsgd_target)} Routing:\n{routing.table()}\n"
        f"Gradient paths:\n{attachment.table()}"
    )
    return optimizer


def _hook_path_reason(training_args: Any) -> str | None:
    """Why this run keeps every MoFaSGD matrix on the gradient-hook path whatever the optimizer says, or None."""
    if training_args.fsdp:
        return "FSDP2 shards the weight; measured cost in docs/algorithm.md"
    if training_args.torch_compile:
        return "torch_compile traces the backward"
    return None


def effective_settings(optimizer: MoFaSGD, target: str) -> str:
    """One line with the values the optimizer really uses (read back from its param groups, not from the config)."""
    mofasgd = next(g for g in optimizer.param_groups if g["mofasgd"])
    adamw = [g for g in optimizer.param_groups if not g["mofasgd"]]

    def show(group: dict[str, Any], key: str, name: str | None = None) -> str:
        value = group[key]
        text = (
            f"{value:g}"
            if isinstance(value, float)
            else ",".join(map(str, value))
            if isinstance(value, tuple)
            else value
        )
        return f"{name or key}={text}"

    keys = ["rank", "beta", "eta1", "eta2", "eps", "max_value", "use_ones_for_nonzero_s", "nesterov"]
    keys += ["use_current_projection", "init", "weight_decay", "lr", "stochastic_rounding", "min_gradient_support"]
    parts = [show(mofasgd, k) for k in keys if k in mofasgd]
    if mofasgd.get("beta_warmup_steps"):
        warmup = f"{mofasgd['beta_start']:g}->{mofasgd['beta_end']:g} over {mofasgd['beta_warmup_steps']} steps"
        parts.append(f"beta warm-up {warmup}")
    parts += [f"fused={optimizer.fused}", f"fused_adamw_side={optimizer.fused_adamw_side}"]
    parts.append(f"projected_backward={optimizer.projected_backward}")
    parts += [f"data_parallel={optimizer.data_parallel}", f"target={target}"]
    if adamw:
        parts.append(
            "AdamW "
            + " ".join(show(adamw[0], k) for k in ("lr", "adam_betas", "adam_eps", "adamw_state") if k in adamw[0])
        )
    return f"Using MoFaSGD: {', '.join(parts)}."
