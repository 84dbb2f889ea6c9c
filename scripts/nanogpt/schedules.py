"""Learning-rate multiplier as a pure function of the step (so resuming needs no scheduler state)."""

from __future__ import annotations

import math

from scripts.nanogpt.config import ScheduleConfig


def lr_factor(step: int, total_steps: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the base learning rates for optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up from 1/warmup_steps to 1 over the first `warmup_steps` steps, then either constant with a linear
    cool-down to `min_lr_frac` over the last `cooldown_frac` of the run, or a half cosine to `min_lr_frac`.
    """
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    floor = schedule.min_lr_frac
    if schedule.kind == "cosine":
        span = max(total_steps - schedule.warmup_steps, 1)
        progress = (step - schedule.warmup_steps) / span
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    cooldown_steps = schedule.cooldown_frac * total_steps
    remaining = total_steps - step
    if remaining >= cooldown_steps:
        return 1.0
    return floor + (1.0 - floor) * remaining / cooldown_steps
