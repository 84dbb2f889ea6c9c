"""The authors' NanoGPT commands and flat config keys run on ours, mapped onto the nested config, still strict."""

import json

import pytest
import torch
import yaml

from scripts.nanogpt import run
from scripts.nanogpt.config import load_config
from scripts.nanogpt.optimizers import _hidden_optimizer

# The two commands of the authors' NanoGPT README (their --config JSON, keys and values as published).
README_MFSGD = {
    "lr": 0.0009,
    "rank": 16,
    "beta": 0.95,
    "eta1": 0.25,
    "eta2": 0,
    "use_current_projection": True,
    "use_ones_for_nonzero_s": False,
    "nesterov": False,
    "eps": 1e-6,
    "max_value": 1000,
    "warmup_steps": 300,
    "beta_start": 0.75,
    "beta_end": 0.95,
    "cooldown_frac": 0.4,
}
README_GALORE = {"lr": 0.008, "group_params": {"rank": 16, "update_proj_gap": 150, "scale": 0.25, "proj_type": "std"}}


def test_authors_mfsgd_command_equals_the_nested_config():
    flat = load_config("mfsgd", overrides=json.dumps(README_MFSGD))
    hidden = {key: value for key, value in README_MFSGD.items() if key not in ("warmup_steps", "cooldown_frac")}
    nested = load_config(
        "mfsgd", overrides={"hidden": {**hidden, "beta_warmup_steps": 300}, "schedule": {"cooldown_frac": 0.4}}
    )
    assert flat == nested
    assert flat.hidden["rank"] == 16 and flat.hidden["beta_warmup_steps"] == 300 and flat.hidden["eta2"] == 0.0


def test_authors_galore_command_sets_the_galore_group():
    config = load_config("galore", overrides=json.dumps(README_GALORE))
    assert {k: config.hidden[k] for k in ("lr", "rank", "update_proj_gap", "scale", "proj_type")} == {
        "lr": 0.008,
        "rank": 16,
        "update_proj_gap": 150,
        "scale": 0.25,
        "proj_type": "std",
    }


def test_authors_command_line_runs_through_run_py(capsys):
    argv = ["--optimizer", "mfsgd", "--num-gpus", "4", "--config", json.dumps(README_MFSGD), "--dry-run"]
    assert run.main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out.split("run name:")[0])
    assert printed["hidden"]["rank"] == 16 and printed["schedule"]["cooldown_frac"] == 0.4


@pytest.mark.parametrize(
    ("optimizer", "flat", "expected"),
    [
        ("mfsgd", {"scheduler_name": "original", "cooldown_frac": 0.3}, ("constant_cooldown", 0, 0.3)),
        ("sgd", {"scheduler_name": "original_warmup"}, ("constant_cooldown", 100, 0.4)),
        ("muon", {"scheduler_name": "cosine"}, ("cosine", 0, 0.4)),
        ("adamw", {"scheduler_name": "cosine_warmup", "lr_warmup_steps": 50}, ("cosine", 50, 0.4)),
    ],
)
def test_authors_scheduler_names_map_onto_our_schedules(optimizer, flat, expected):
    schedule = load_config(optimizer, overrides=flat).schedule
    assert (schedule.kind, schedule.warmup_steps, schedule.cooldown_frac) == expected


def test_authors_style_optimizer_yaml_files_load_as_config_path(tmp_path):
    """Files in the layout of the authors' configs/optimizers/*.yaml (our own values), one per optimizer."""
    files = {
        "mfsgd": {
            "lr": 0.01,
            "rank": 8,
            "beta": 0.9,
            "eta1": 0.5,
            "eta2": 0,
            "eps": 1e-8,
            "max_value": 100,
            "use_current_projection": False,
            "use_ones_for_nonzero_s": True,
            "nesterov": True,
            "warmup_steps": 50,
            "beta_start": 0.5,
            "beta_end": 0.9,
            "scheduler_name": "original",
            "cooldown_frac": 0.2,
        },  # fmt: skip
        "galore": {
            "lr": 0.002,
            "betas": [0.9, 0.99],
            "weight_decay": 0.01,
            "eps": 1e-7,
            "cooldown_frac": 0.3,
            "group_params": {"rank": 4, "update_proj_gap": 20, "scale": 0.5, "proj_type": "std"},
        },  # fmt: skip
        "adamw": {"lr": 0.001, "betas": [0.9, 0.98], "weight_decay": 0.05, "fused": True, "cooldown_frac": 0.1},
        "muon": {"lr": 0.03, "momentum": 0.9, "nesterov": False, "ns_steps": 4},
        "sgd": {"lr": 0.02, "momentum": 0.8, "nesterov": False, "cooldown_frac": 0.5},
    }
    for optimizer, values in files.items():
        path = tmp_path / f"{optimizer}.yaml"
        path.write_text(yaml.safe_dump(values))
        config = load_config(optimizer, config_path=path)
        expected = {**values, **values.get("group_params", {})}
        for key, value in expected.items():
            if key in ("group_params", "scheduler_name", "cooldown_frac"):
                continue
            ours = {"warmup_steps": "beta_warmup_steps"}.get(key, key)
            got = config.hidden[ours]
            assert (list(got) if isinstance(got, tuple) else got) == value, (optimizer, key)
        assert config.schedule.cooldown_frac == values.get("cooldown_frac", 0.4)


@pytest.mark.parametrize(
    ("optimizer", "flat", "message"),
    [
        ("mfsgd", {"lrr": 0.1}, "unknown config key 'lrr' for --optimizer mfsgd"),
        ("mfsgd", {"group_params": {"rank": 4}}, "unknown config key 'group_params'"),
        ("galore", {"group_params": {"rnak": 4}}, "unknown config key 'group_params.rnak'"),
        ("galore", {"group_params": [4]}, "'group_params' must be a mapping"),
        ("muon", {"warmup_steps": 300}, "unknown config key 'warmup_steps'"),
        ("sgd", {"scheduler_name": "exponential"}, "scheduler_name 'exponential' is not supported"),
        ("adamw", {"min_lr": 1e-5}, "unknown config key 'min_lr'"),
        ("mfsgd", {"rank": "sixteen"}, "'hidden.rank' must be an integer"),
    ],
)
def test_everything_else_stays_strict(optimizer, flat, message):
    with pytest.raises(ValueError, match=message):
        load_config(optimizer, overrides=flat)


def test_authors_adamw_fused_key_selects_torchs_fused_kernel():
    hidden = load_config("adamw", overrides={"fused": True}).hidden
    optimizer = _hidden_optimizer("adamw", [torch.nn.Parameter(torch.randn(4, 4))], hidden)
    assert optimizer.param_groups[0]["fused"] is True
