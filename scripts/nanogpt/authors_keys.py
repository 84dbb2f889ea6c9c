"""The authors' flat NanoGPT config keys, mapped onto our nested layout.

The authors' NanoGPT repository (pmahdavi/MoFaSGD) describes a run with one flat mapping per optimizer, in its
``configs/optimizers/*.yaml`` and in ``--config`` JSON, e.g. ``{"lr": 0.0009, "rank": 16, "warmup_steps": 300,
"cooldown_frac": 0.4}`` or, for GaLore, ``{"lr": 0.008, "group_params": {"rank": 16, ...}}``. A layer that holds
such keys is rewritten into ``hidden`` / ``schedule`` sections before merging; keys of our own layout pass through,
and anything that is neither is refused with its name, as before.

=====================  ==========================================================================
authors' key           ours
=====================  ==========================================================================
hyperparameters        ``hidden.<key>`` (lr, rank, beta, eta1, eta2, eps, max_value, betas, ...)
``warmup_steps``       ``hidden.beta_warmup_steps`` (MoFaSGD's linear beta warm-up)
``group_params``       GaLore only: its rank / update_proj_gap / scale / proj_type go to ``hidden``
``cooldown_frac``      ``schedule.cooldown_frac``
``scheduler_name``     ``original`` / ``original_warmup`` -> ``schedule.kind: constant_cooldown``;
                       ``cosine`` / ``cosine_warmup`` -> ``schedule.kind: cosine``
``lr_warmup_steps``    ``schedule.warmup_steps`` (the ``*_warmup`` schedules default to 100, as theirs)
=====================  ==========================================================================

Two differences remain: our schedule scales every param group (theirs leaves the Adam side on ``original``), and
their ``exponential`` schedule and ``min_lr`` (an absolute floor) have no counterpart here: use
``schedule.min_lr_frac`` instead.
"""

from __future__ import annotations

from typing import Any

OWN_SECTIONS = ("optimizer", "hidden", "out_dir", "run_name", "model", "data", "adam", "schedule", "train", "mem_prof")
RENAMED = {"mfsgd": {"warmup_steps": "beta_warmup_steps"}}
GALORE_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
SCHEDULES = {
    "original": ("constant_cooldown", 0),
    "original_warmup": ("constant_cooldown", 100),
    "cosine": ("cosine", 0),
    "cosine_warmup": ("cosine", 100),
}
SCHEDULE_KEYS = ("cooldown_frac", "scheduler_name", "lr_warmup_steps")


def _unknown(key: str, optimizer: str, known: list[str]) -> ValueError:
    return ValueError(
        f"unknown config key '{key}' for --optimizer {optimizer} (flat keys accepted here: "
        f"{', '.join(sorted(known))}; or our sections: {', '.join(OWN_SECTIONS)})"
    )


def _schedule(flat: dict[str, Any]) -> dict[str, Any]:
    schedule: dict[str, Any] = {}
    if "cooldown_frac" in flat:
        schedule["cooldown_frac"] = flat["cooldown_frac"]
    if "scheduler_name" in flat:
        name = flat["scheduler_name"]
        if name not in SCHEDULES:
            raise ValueError(f"scheduler_name {name!r} is not supported here (choose from: {', '.join(SCHEDULES)})")
        schedule["kind"], schedule["warmup_steps"] = SCHEDULES[name]
    if "lr_warmup_steps" in flat:
        schedule["warmup_steps"] = flat["lr_warmup_steps"]
    return schedule


def from_authors_keys(optimizer: str, values: dict[str, Any], hidden_keys: list[str]) -> dict[str, Any]:
    """`values` with the authors' flat keys moved into our ``hidden`` and ``schedule`` sections.

    Args:
        optimizer: the run's optimizer (decides renames and GaLore's ``group_params``).
        values: one config layer (a YAML file or the ``--config`` JSON).
        hidden_keys: the known keys of ``hidden`` for this optimizer.

    Raises:
        ValueError: for a key that is neither ours nor one of the authors' for this optimizer.
    """
    flat = {key: value for key, value in values.items() if key not in OWN_SECTIONS}
    if not flat:
        return values
    renames = RENAMED.get(optimizer, {})
    known = [*SCHEDULE_KEYS, *hidden_keys, *renames] + (["group_params"] if optimizer == "galore" else [])
    hidden: dict[str, Any] = {}
    for key, value in flat.items():
        if key in SCHEDULE_KEYS:
            continue
        if key == "group_params" and optimizer == "galore":
            if not isinstance(value, dict):
                raise ValueError(f"config key 'group_params' must be a mapping, got {value!r}")
            for inner, inner_value in value.items():
                if inner not in GALORE_GROUP_KEYS:
                    raise _unknown(f"group_params.{inner}", optimizer, list(GALORE_GROUP_KEYS))
                hidden[inner] = inner_value
        elif renames.get(key, key) in hidden_keys:
            hidden[renames.get(key, key)] = value
        else:
            raise _unknown(key, optimizer, known)
    nested = {key: value for key, value in values.items() if key in OWN_SECTIONS}
    for section, moved in (("hidden", hidden), ("schedule", _schedule(flat))):
        if moved:
            nested[section] = {**(nested.get(section) or {}), **moved}
    return nested
