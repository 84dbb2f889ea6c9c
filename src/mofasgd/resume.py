"""What a resume checks and needs beyond loading: the routing layout, the scheduler's base lrs, sharded FSDP2 state.

``MoFaSGD.load_state_dict`` and both trainers' paths (LLaMA-Factory's and
:mod:`mofasgd.integrations.transformers`) call these.
"""

from __future__ import annotations

from typing import Any

import torch


def routing_layout(groups: list[dict[str, Any]]) -> list[tuple[bool, int]]:
    """(MoFaSGD matrices?, number of tensors) per param group: what a checkpoint must share with the optimizer.

    Two MoFaSGD states with other layouts route other tensors to MoFaSGD (another target, other trainable
    parameters, another model), so the saved factors and moments would land on the wrong tensors.
    """
    return [(bool(g.get("mofasgd")), len(g.get("params", []))) for g in groups]


def scheduler_follows_running_lrs(optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """After a resume, give `scheduler` the base learning rates of this run (the config's, kept by MoFaSGD's load).

    A trainer loads the scheduler after the optimizer, and the scheduler's state holds the checkpoint's ``base_lrs``:
    its next step would bring the old learning rates back. MoFaSGD keeps this run's in each group's ``initial_lr``
    (and logs ``lr (base, initial_lr): old -> new`` when they changed); its ``lr`` keeps the saved schedule position.
    Does nothing for another optimizer, or a scheduler without ``base_lrs``.
    """
    groups = getattr(optimizer, "param_groups", [])
    if not any("mofasgd" in g for g in groups) or not hasattr(scheduler, "base_lrs"):
        return
    if len(scheduler.base_lrs) == len(groups) and all("initial_lr" in g for g in groups):
        scheduler.base_lrs = [g["initial_lr"] for g in groups]
        scheduler._last_lr = [g["lr"] for g in groups]  # what a trainer logs as the learning rate


def load_fsdp2_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Load a sharded FSDP2 optimizer checkpoint (a DCP `directory`) into `optimizer`, keyed by parameter names.

    accelerate (1.11) reads such a directory into ``optimizer.state_dict()`` of the fresh optimizer: that template
    has no state yet and is keyed by parameter ids, not by the names it was saved under, so nothing is read and the
    factors and moments would silently start over. Here the template is torch's ``get_optimizer_state_dict`` (its
    state created by a zero-learning-rate step, keyed by names, U and the moments as DTensors), which DCP fills in
    place. Every rank calls it (a collective), after FSDP2 has sharded `model` and the optimizer adopted its shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=directory)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
