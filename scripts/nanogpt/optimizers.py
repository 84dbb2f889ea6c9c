"""The optimizer split: the compared optimizer on the hidden matrices, Adam on everything else.

Every run trains the embedding, LM head and norm gains with the same Adam settings (`AdamConfig`),
so runs differ only in what updates the hidden matrices:

    mfsgd   MoFaSGD (this project); its own AdamW side takes the other groups, so it is one optimizer
    galore  GaLoreAdamW from PyPI galore-torch, plus torch AdamW for the rest
    adamw   torch AdamW, plus torch AdamW for the rest
    muon    Muon (muon.py), plus torch AdamW for the rest
    sgd     torch SGD with momentum, plus torch AdamW for the rest
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scripts.nanogpt.config import RunConfig
from scripts.nanogpt.muon import Muon


def _adam_groups(roles: dict[str, list[nn.Parameter]], config: RunConfig) -> list[dict[str, Any]]:
    adam = config.adam
    lrs = {"embed": adam.embed_lr, "head": adam.head_lr, "scalars": adam.scalar_lr}
    return [{"params": roles[role], "lr": lr} for role, lr in lrs.items() if roles[role]]


def _mfsgd(
    hidden: list[nn.Parameter], adam_groups: list[dict[str, Any]], config: RunConfig, world_size: int
) -> list[torch.optim.Optimizer]:
    from mofasgd import MoFaSGD

    h = dict(config.hidden)
    warmup = h.pop("beta_warmup_steps")
    beta_start, beta_end = h.pop("beta_start"), h.pop("beta_end")
    if warmup > 0:
        h.update(beta_start=beta_start, beta_end=beta_end, beta_warmup_steps=warmup)
    # The fused hook consumes each process's local gradient; with several processes MoFaSGD averages
    # the thin projections itself. Unfused, the trainer's all-reduce of .grad does the averaging.
    h["data_parallel"] = h["fused"] and world_size > 1
    side = [{**g, "mofasgd": False, "weight_decay": config.adam.weight_decay} for g in adam_groups]
    return [MoFaSGD([{"params": hidden}, *side], adam_betas=config.adam.betas, adam_eps=config.adam.eps, **h)]


def _hidden_optimizer(name: str, hidden: list[nn.Parameter], h: dict[str, Any]) -> torch.optim.Optimizer:
    if name == "galore":
        from galore_torch import GaLoreAdamW

        group = {"params": hidden, "rank": h["rank"], "update_proj_gap": h["update_proj_gap"]}
        group |= {"scale": h["scale"], "proj_type": h["proj_type"]}
        return GaLoreAdamW(
            [group],
            lr=h["lr"],
            betas=h["betas"],
            eps=h["eps"],
            weight_decay=h["weight_decay"],
            no_deprecation_warning=True,
        )
    if name == "adamw":
        fused = h["fused"] or None  # None: torch's default kernel choice
        return torch.optim.AdamW(
            hidden, lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"], fused=fused
        )
    if name == "muon":
        return Muon(
            hidden,
            lr=h["lr"],
            momentum=h["momentum_start"] if h["momentum_warmup_steps"] else h["momentum"],
            nesterov=h["nesterov"],
            ns_steps=h["ns_steps"],
            weight_decay=h["weight_decay"],
        )
    if name == "sgd":
        return torch.optim.SGD(
            hidden, lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"], weight_decay=h["weight_decay"]
        )
    raise ValueError(f"unknown optimizer {name!r}")


def build_optimizers(
    roles: dict[str, list[nn.Parameter]], config: RunConfig, world_size: int = 1
) -> list[torch.optim.Optimizer]:
    """Optimizers for one run, in a fixed order (the order checkpoints store them in)."""
    adam_groups = _adam_groups(roles, config)
    if config.optimizer == "mfsgd":
        return _mfsgd(roles["hidden"], adam_groups, config, world_size)
    adam = config.adam
    side = torch.optim.AdamW(adam_groups, betas=adam.betas, eps=adam.eps, weight_decay=adam.weight_decay)
    return [_hidden_optimizer(config.optimizer, roles["hidden"], config.hidden), side]


def set_step_hyperparameters(
    optimizers: list[torch.optim.Optimizer],
    base_lrs: list[list[float]],
    lr_factor: float,
    config: RunConfig,
    step: int,
) -> None:
    """Scale every group's lr by the schedule factor; warm Muon's momentum up (MoFaSGD warms beta itself)."""
    for optimizer, lrs in zip(optimizers, base_lrs):
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr * lr_factor
    if config.optimizer == "muon" and config.hidden["momentum_warmup_steps"]:
        h = config.hidden
        frac = min(step / h["momentum_warmup_steps"], 1.0)
        for group in optimizers[0].param_groups:
            group["momentum"] = (1 - frac) * h["momentum_start"] + frac * h["momentum"]


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if hasattr(value, "ortho_matrix"):  # galore-torch keeps its projection basis in a Python object
        return _tensor_bytes(value.ortho_matrix)
    return 0


def state_bytes(optimizers: list[torch.optim.Optimizer], params: list[nn.Parameter]) -> int:
    """Bytes of optimizer state held for `params` (momenta, second moments, factors, projectors)."""
    wanted = {id(p) for p in params}
    total = 0
    for optimizer in optimizers:
        for p, state in optimizer.state.items():
            if id(p) in wanted:
                total += sum(_tensor_bytes(v) for v in state.values())
    return total


def checkpoint_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`state_dict()` with only tensors and plain data, so `torch.load(weights_only=True)` accepts it.

    galore-torch stores a GaLoreProjector object per matrix; its basis is kept as a tensor instead.
    """
    state_dict = optimizer.state_dict()
    # state_dict() shares the per-parameter dicts with the live optimizer: edit copies.
    state_dict["state"] = {key: dict(state) for key, state in state_dict["state"].items()}
    for state in state_dict["state"].values():
        projector = state.pop("projector", None)
        if projector is not None and projector.ortho_matrix is not None:
            state["projector_basis"] = projector.ortho_matrix
    return state_dict


def load_checkpoint_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Inverse of `checkpoint_state`: load, then rebuild galore-torch projectors from their bases."""
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "projector_basis" in state:
                from galore_torch.galore_projector import GaLoreProjector

                projector = GaLoreProjector(
                    group["rank"],
                    update_proj_gap=group["update_proj_gap"],
                    scale=group["scale"],
                    proj_type=group["proj_type"],
                )
                projector.ortho_matrix = state.pop("projector_basis")
                state["projector"] = projector
