"""Learning-rate scheduler kwargs: checked at parse time, and the authors' WSD `cooldown_ratio` turned into steps.

HF Trainer passes ``lr_scheduler_kwargs`` to the scheduler function only when the scheduler is created, after the
model and data are loaded; a misspelt or foreign key then fails minutes into a GPU job. :func:`check_scheduler_kwargs`
builds the configured scheduler once at parse time on a one-parameter optimizer and turns any failure into one
clear error. ``warmup_stable_decay`` also accepts ``cooldown_ratio`` (the fraction of the training steps spent
decaying, the authors' key): at scheduler creation it becomes ``num_decay_steps`` and ``num_stable_steps``.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, get_scheduler
from transformers.trainer_utils import SchedulerType

COOLDOWN_RATIO = "cooldown_ratio"
# Steps assumed for the parse-time trial when the real count (from the dataset size) is not known yet.
TRIAL_STEPS = 1000
_PASSED_BY_TRAINER = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")


def _is_wsd(lr_scheduler_type: Any) -> bool:
    return SchedulerType(lr_scheduler_type) == SchedulerType.WARMUP_STABLE_DECAY


def accepted_kwargs(lr_scheduler_type: Any) -> list[str]:
    """The ``lr_scheduler_kwargs`` keys a scheduler type takes (``cooldown_ratio`` included for WSD)."""
    name = SchedulerType(lr_scheduler_type)
    parameters = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[name]).parameters
    keys = [key for key in parameters if key not in _PASSED_BY_TRAINER]
    return keys + [COOLDOWN_RATIO] if name == SchedulerType.WARMUP_STABLE_DECAY else keys


def resolve_cooldown_ratio(kwargs: dict[str, Any], num_training_steps: int, num_warmup_steps: int) -> dict[str, Any]:
    """Replace ``cooldown_ratio`` by ``num_decay_steps = round(ratio * steps)`` and the stable steps left over.

    Raises:
        ValueError: if warm-up and cool-down together need more steps than the run has.
    """
    kwargs = dict(kwargs)
    ratio = kwargs.pop(COOLDOWN_RATIO)
    num_decay_steps = round(ratio * num_training_steps)
    num_stable_steps = num_training_steps - num_warmup_steps - num_decay_steps
    if num_stable_steps < 0:
        raise ValueError(
            f"`{COOLDOWN_RATIO}: {ratio}` asks for {num_decay_steps} decay steps, but after {num_warmup_steps} "
            f"warm-up steps only {num_training_steps - num_warmup_steps} of {num_training_steps} are left."
        )
    return {**kwargs, "num_decay_steps": num_decay_steps, "num_stable_steps": num_stable_steps}


def _check_cooldown_ratio(training_args: Any, kwargs: dict[str, Any]) -> None:
    ratio = kwargs[COOLDOWN_RATIO]
    if not _is_wsd(training_args.lr_scheduler_type):
        raise ValueError(
            f"`lr_scheduler_kwargs: {{{COOLDOWN_RATIO}: ...}}` applies to `lr_scheduler_type: warmup_stable_decay`, "
            f"not `{SchedulerType(training_args.lr_scheduler_type).value}`."
        )
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(
            f"Invalid `{COOLDOWN_RATIO}: {ratio!r}`: expected a fraction of the training steps in [0, 1]."
        )
    clash = sorted({"num_decay_steps", "num_stable_steps"} & set(kwargs))
    if clash:
        raise ValueError(f"`{COOLDOWN_RATIO}` sets the decay and stable steps; remove {clash} or `{COOLDOWN_RATIO}`.")
    warmup = training_args.warmup_steps  # transformers 5 stores `warmup_ratio` here as a fraction below 1
    if 0 < warmup < 1 and warmup + ratio > 1.0:
        raise ValueError(f"A warm-up ratio of {warmup} plus `{COOLDOWN_RATIO}: {ratio}` exceed the whole run.")


def check_scheduler_kwargs(training_args: Any, fill_defaults: Callable[[Any, int], None] | None = None) -> None:
    """Build the configured scheduler once on a dummy optimizer; raise one clear ValueError if that would fail.

    Args:
        training_args: the parsed HF training arguments (not modified).
        fill_defaults: LLaMA-Factory's ``create_custom_scheduler``-like hook ``(args, steps)`` that completes the
            kwargs the way training will (WSD stable/decay defaults); applied to a copy.
    """
    kwargs = training_args.lr_scheduler_kwargs
    if not kwargs:
        return
    if not isinstance(kwargs, dict):
        raise ValueError(f"`lr_scheduler_kwargs` must be a mapping, got {kwargs!r}.")
    name = SchedulerType(training_args.lr_scheduler_type)
    steps = training_args.max_steps if training_args.max_steps and training_args.max_steps > 0 else TRIAL_STEPS
    trial = copy.copy(training_args)
    trial.lr_scheduler_kwargs = dict(kwargs)
    if COOLDOWN_RATIO in kwargs:
        _check_cooldown_ratio(training_args, kwargs)
    try:
        if COOLDOWN_RATIO in kwargs:
            trial.lr_scheduler_kwargs = resolve_cooldown_ratio(kwargs, steps, training_args.get_warmup_steps(steps))
        if fill_defaults is not None:
            fill_defaults(trial, steps)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_scheduler(
                name,
                optimizer=optimizer,
                num_warmup_steps=trial.get_warmup_steps(steps),
                num_training_steps=steps,
                scheduler_specific_kwargs=trial.lr_scheduler_kwargs,
            )
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"`lr_scheduler_kwargs: {kwargs}` does not work with `lr_scheduler_type: {name.value}` ({error}). "
            f"It accepts: {', '.join(accepted_kwargs(name)) or 'no keys'}."
        ) from error


def lr_factors(training_args: Any, steps: int) -> list[float]:
    """The learning-rate multiplier at each of `steps` optimizer steps under the run's scheduler.

    The scheduler is built as trainers build it (LLaMA-Factory's ``create_custom_scheduler``, then HF's
    ``get_scheduler``), on a one-parameter optimizer.
    """
    from llamafactory.train.trainer_utils import create_custom_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    create_custom_scheduler(training_args, steps, optimizer)
    scheduler = get_scheduler(
        training_args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=training_args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=training_args.lr_scheduler_kwargs,
    )
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def wrap_create_custom_scheduler(original: Callable[..., Any]) -> Callable[..., Any]:
    """LLaMA-Factory's ``create_custom_scheduler`` that first turns a WSD ``cooldown_ratio`` into step counts."""

    def create_custom_scheduler(training_args, num_training_steps, optimizer=None):
        kwargs = training_args.lr_scheduler_kwargs
        if isinstance(kwargs, dict) and COOLDOWN_RATIO in kwargs and _is_wsd(training_args.lr_scheduler_type):
            warmup = training_args.get_warmup_steps(num_training_steps)
            training_args.lr_scheduler_kwargs = resolve_cooldown_ratio(kwargs, num_training_steps, warmup)
        return original(training_args, num_training_steps, optimizer)

    create_custom_scheduler.__doc__ = original.__doc__
    return create_custom_scheduler
