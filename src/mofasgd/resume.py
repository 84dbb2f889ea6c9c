"""What a resume needs beyond ``MoFaSGD.load_state_dict``: the LR scheduler follows this run's base learning rates."""

from __future__ import annotations

from typing import Any

import torch


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
