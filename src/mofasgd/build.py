"""One MoFaSGD optimizer for a whole model: routing, param groups, data-parallel set-up and the projected backward.

The LLaMA-Factory factory (``llamafactory_mfsgd.optimizer_factory``) and the transformers integration
(``mofasgd.integrations.transformers``) both build their optimizer here, so the two cannot drift apart. Error and
warning texts name the caller's keys through ``key_prefix`` (``mfsgd_`` for the YAML keys, empty for Python
options).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from torch import nn

from mofasgd.data_parallel import ignore_managed_in_ddp
from mofasgd.optimizer import MoFaSGD
from mofasgd.projected_linear import Attachment
from mofasgd.routing import Routing, split_for_mofasgd


class Built(NamedTuple):
    """What :func:`build_for_model` made: the optimizer, the routing it used and the gradient path of each matrix."""

    optimizer: MoFaSGD
    routing: Routing
    attachment: Attachment

    def report(self, target: str | list[str]) -> str:
        """The start-up log: the settings in effect, the routing table and each matrix's gradient path."""
        return (
            f"{effective_settings(self.optimizer, target)} Routing:\n{self.routing.table()}\n"
            f"Gradient paths:\n{self.attachment.table()}"
        )


def hook_path_reason(sharded: bool, compiled: bool) -> str | None:
    """Why a run keeps every MoFaSGD matrix on the gradient-hook path whatever the optimizer says, or None."""
    if sharded:
        return "FSDP2 shards the weight; measured cost in docs/algorithm.md"
    if compiled:
        return "torch_compile traces the backward"
    return None


def build_for_model(
    model: nn.Module,
    *,
    lr: float,
    adamw_lr: float,
    weight_decay: float,
    decay_names: Iterable[str],
    target: str | list[str] = "all",
    data_parallel: bool = False,
    sharded: bool = False,
    accumulation_boundary: Callable[[], bool] | None = None,
    hook_path_reason: str | None = None,
    key_prefix: str = "",
    **options: Any,
) -> Built:
    """Route `model`'s parameters, build one MoFaSGD over them and attach it to the model.

    Groups: the routed matrices at `lr` with `weight_decay`; the AdamW side at `adamw_lr`, split into the parameters
    named in `decay_names` (with `weight_decay`) and the rest (none). With `data_parallel` the managed matrices (and
    the fused AdamW side's matrices) are left out of DDP's all-reduce, the optimizer averaging them itself: call this
    before the model is wrapped in DDP. `sharded` (FSDP2 will shard the model) refuses expert stacks, which are
    stepped only unsharded. `accumulation_boundary` tells the fused AdamW side when a backward ends an accumulation
    window. `options` are MoFaSGD's constructor options.
    """
    routing = split_for_mofasgd(model, target)
    target_key = f"{key_prefix}target"
    if not routing.mofasgd:
        raise ValueError(
            f"`{target_key}: {target}` matches no trainable 2-D weight of this model; "
            "use `all` or module names such as `q_proj,v_proj,mlp`."
        )
    experts = [name for name, p in routing.mofasgd if p.dim() == 3]
    if experts and sharded:
        raise ValueError(
            f"FSDP2 would shard the MoE expert stacks ({len(experts)} tensors, e.g. `{experts[0]}`), which MoFaSGD "
            f"steps only unsharded: set `{target_key}` to the modules without `experts` (e.g. "
            "`q_proj,k_proj,v_proj,o_proj`; the experts then train with AdamW), or train with DDP (no FSDP)."
        )
    decay_names = set(decay_names)
    # (name, parameter) pairs: torch keeps the names in the param groups, so MoFaSGD's errors name the matrix
    groups = [{"params": list(routing.mofasgd), "lr": lr, "weight_decay": weight_decay}]
    decay = [(n, p) for n, p in routing.adamw if n in decay_names]
    no_decay = [(n, p) for n, p in routing.adamw if n not in decay_names]
    for params, group_decay in ((decay, weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": params, "mofasgd": False, "lr": adamw_lr, "weight_decay": group_decay})
    optimizer = MoFaSGD(groups, lr=lr, data_parallel=data_parallel, **options)
    if data_parallel:  # the optimizer averages these itself: the managed matrices' projections, and with the fused
        # AdamW side its matrices' gradients (in their hooks)
        fused_side = [p for _, p in routing.adamw if p.dim() == 2] if optimizer.fused_adamw_side else []
        ignore_managed_in_ddp(model, [p for _, p in routing.mofasgd] + fused_side)
    if optimizer.fused_adamw_side:
        optimizer.accumulation_boundary = accumulation_boundary
    attachment = optimizer.attach(model, reason=hook_path_reason)
    return Built(optimizer, routing, attachment)


def rank_above_size_message(matrices: list[tuple[str, nn.Parameter]], rank: int, key_prefix: str = "") -> str | None:
    """A warning naming, by shape, the matrices whose smaller side is below `rank` (they keep min(m, n)), or None.

    A warning, not an error: such a matrix trains correctly (its momentum is exact, full rank), one rank serves the
    whole model, and small matrices (GQA k/v projections, routers) may sit below a rank that suits the others.
    """
    clamped: dict[tuple[int, int], list[str]] = {}
    for name, p in matrices:
        if rank > min(p.shape[-2:]):  # a stack of experts: the size of each expert's matrix
            clamped.setdefault(tuple(p.shape[-2:]), []).append(name)
    if not clamped:
        return None
    shapes = "; ".join(
        f"{len(names)} of shape {m}x{n} (e.g. `{names[0]}`) keep rank {min(m, n)}" for (m, n), names in clamped.items()
    )
    count = sum(len(names) for names in clamped.values())
    rank_key, target_key = f"{key_prefix}rank", f"{key_prefix}target"
    return (
        f"`{rank_key}: {rank}` is above the size of {count} of the {len(matrices)} MoFaSGD matrices, which keep rank "
        f"min(m, n) instead (rank {rank} -> min(m, n)): {shapes}. Their momentum is then exact but not compact: "
        f"(m + n + 1) * r factor numbers, more than the m * n of the matrix. Lower `{rank_key}`, or leave them out of "
        f"`{target_key}`."
    )


def effective_settings(optimizer: MoFaSGD, target: str | list[str]) -> str:
    """One line with the values the optimizer really uses (read back from its param groups, not from the config)."""
    mofasgd = next(g for g in optimizer.param_groups if g["mofasgd"])
    adamw = [g for g in optimizer.param_groups if not g["mofasgd"]]

    def show(group: dict[str, Any], key: str) -> str:
        value = group[key]
        text = (
            f"{value:g}"
            if isinstance(value, float)
            else ",".join(map(str, value))
            if isinstance(value, tuple)
            else value
        )
        return f"{key}={text}"

    keys = ["rank", "beta", "eta1", "eta2", "eps", "max_value", "use_ones_for_nonzero_s", "nesterov"]
    keys += ["use_current_projection", "init", "weight_decay", "lr", "stochastic_rounding", "min_gradient_support"]
    parts = [show(mofasgd, k) for k in keys if k in mofasgd]
    if mofasgd.get("beta_warmup_steps"):
        warmup = f"{mofasgd['beta_start']:g}->{mofasgd['beta_end']:g} over {mofasgd['beta_warmup_steps']} steps"
        parts.append(f"beta warm-up {warmup}")
    parts += [f"fused={optimizer.fused}", f"fused_adamw_side={optimizer.fused_adamw_side}"]
    parts.append(f"projected_backward={optimizer.projected_backward}")
    parts.append(f"rounding_kernel={optimizer.rounding_kernel.option}")  # the bf16 update's; resolved at step 1
    if optimizer.capturable:
        parts.append("capturable=True")
    target = target if isinstance(target, str) else ",".join(target)
    parts += [f"data_parallel={optimizer.data_parallel}", f"target={target}"]
    if adamw:
        parts.append(
            "AdamW "
            + " ".join(show(adamw[0], k) for k in ("lr", "adam_betas", "adam_eps", "adamw_state") if k in adamw[0])
        )
    return f"Using MoFaSGD: {', '.join(parts)}."
