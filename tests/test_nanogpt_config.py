import json

import pytest

from mofasgd import DEFAULTS as MOFASGD_DEFAULTS
from scripts.nanogpt import run
from scripts.nanogpt.config import (
    HIDDEN_DEFAULTS,
    OPTIMIZER_CONFIG_DIR,
    ScheduleConfig,
    deep_merge,
    derive_run_name,
    load_config,
    read_yaml,
)
from scripts.nanogpt.schedules import lr_factor


@pytest.mark.parametrize("optimizer", list(HIDDEN_DEFAULTS))
def test_base_configs_load_and_match_the_documented_keys(optimizer):
    config = load_config(optimizer)
    assert config.optimizer == optimizer
    assert set(config.hidden) == set(HIDDEN_DEFAULTS[optimizer])


def test_mfsgd_base_yaml_agrees_with_the_hidden_defaults_derived_from_mofasgd():
    """configs/optimizers/mfsgd.yaml repeats, key for key, the defaults derived from MoFaSGD's own table."""
    hidden = read_yaml(OPTIMIZER_CONFIG_DIR / "mfsgd.yaml")["hidden"]
    assert hidden == HIDDEN_DEFAULTS["mfsgd"]
    assert set(hidden) <= set(MOFASGD_DEFAULTS)


def test_base_mfsgd_config_has_the_authors_hyperparameters_at_rank_32():
    hidden = load_config("mfsgd").hidden
    expected = {
        "lr": 0.0009,
        "rank": 32,
        "beta": 0.95,
        "eta1": 0.25,
        "eta2": 0.0,
        "use_current_projection": True,
        "use_ones_for_nonzero_s": False,
        "nesterov": False,
        "eps": 1e-6,
        "max_value": 1000.0,
        "beta_warmup_steps": 300,
        "beta_start": 0.75,
        "beta_end": 0.95,
    }
    assert {key: hidden[key] for key in expected} == expected
    galore = load_config("galore").hidden
    assert (galore["lr"], galore["update_proj_gap"], galore["scale"], galore["proj_type"]) == (0.008, 150, 0.25, "std")


def test_layers_merge_in_order_and_keep_untouched_siblings(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("hidden:\n  rank: 4\n  eps: 1e-5\ntrain:\n  steps: 7\n  seq_len: 64\nmodel:\n  width: 96\n")
    overrides = json.dumps({"hidden": {"rank": 8}, "train": {"steps": 9}})
    config = load_config("mfsgd", extra, overrides, {"train": {"steps": 11}})

    assert config.hidden["rank"] == 8  # JSON beats the YAML layer
    assert config.hidden["eps"] == 1e-5  # YAML's "1e-5" (a string to PyYAML) is read as a number
    assert config.hidden["lr"] == 0.0009  # base value survives a partial override of the section
    assert config.train.steps == 11  # flags beat JSON
    assert config.train.seq_len == 64 and config.model.width == 96
    assert config.model.depth == 12  # dataclass default where no layer speaks


def test_deep_merge_does_not_modify_its_inputs():
    base = {"a": {"b": 1, "c": 2}}
    merged = deep_merge(base, {"a": {"b": 3}})
    assert merged == {"a": {"b": 3, "c": 2}} and base == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize(
    ("optimizer", "overrides", "message"),
    [
        ("adam", {}, "unknown optimizer 'adam'"),
        ("mfsgd", {"train": {"stepz": 3}}, "unknown config key 'train.stepz'"),
        ("mfsgd", {"hidden": {"update_proj_gap": 3}}, "unknown config key 'hidden.update_proj_gap'"),
        ("galore", {"hidden": {"eta1": 1.0}}, "unknown config key 'hidden.eta1'"),
        ("muon", {"modle": {}}, "unknown config key 'modle'"),
        ("sgd", {"hidden": {"lr": "fast"}}, "'hidden.lr' must be a number"),
        ("sgd", {"train": {"steps": 1.5}}, "'train.steps' must be an integer"),
        ("sgd", {"schedule": {"kind": "linear"}}, "schedule.kind"),
        ("adamw", {"model": {"width": 100, "heads": 3}}, "model.width"),
        ("adamw", {"train": {"batch_tokens": 1000}}, "train.batch_tokens"),
    ],
)
def test_bad_input_fails_with_the_key_named(optimizer, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(optimizer, overrides=overrides)


def test_run_names_describe_the_run_and_differ_where_runs_differ():
    config = load_config("mfsgd", overrides={"train": {"steps": 100}})
    name = derive_run_name(config)
    assert name == "mfsgd_r32_lr0.0009_eta0.25_b0.75-0.95_d12w768_T1024_bt524288_s100_cd0.4"
    assert derive_run_name(load_config("mfsgd", overrides={"train": {"steps": 100}})) == name

    rank8 = derive_run_name(load_config("mfsgd", overrides={"hidden": {"rank": 8}, "train": {"steps": 100}}))
    assert "_r8_" in rank8 and rank8 != name
    no_warmup = derive_run_name(load_config("mfsgd", overrides={"hidden": {"beta_warmup_steps": 0}}))
    assert "_b0.95_" in no_warmup
    cosine = derive_run_name(load_config("muon", overrides={"schedule": {"kind": "cosine", "warmup_steps": 10}}))
    assert cosine.startswith("muon_lr0.05_m0.95_") and cosine.endswith("_cos_wu10")
    galore = derive_run_name(load_config("galore", overrides={"train": {"seed": 3}}))
    assert galore.startswith("galore_r32_lr0.008_gap150_sc0.25_") and galore.endswith("_seed3")
    for candidate in (name, rank8, no_warmup, cosine, galore):
        assert "/" not in candidate and " " not in candidate


def test_run_py_dry_run_prints_the_resolved_config(capsys, tmp_path):
    args = ["--optimizer", "galore", "--config", '{"hidden": {"rank": 8}}', "--width", "64", "--heads", "2"]
    args += ["--depth", "2", "--seq-len", "32", "--steps", "5", "--out-dir", str(tmp_path), "--num-gpus", "2"]
    code = run.main([*args, "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "run name: galore_r8_lr0.008_gap150_sc0.25_d2w64_T32_" in out
    assert "torch.distributed.run" in out and "--nproc_per_node=2" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_run_py_reports_bad_keys_without_a_traceback(capsys):
    assert run.main(["--optimizer", "mfsgd", "--config", '{"hidden": {"rnak": 8}}', "--dry-run"]) == 2
    assert "unknown config key 'hidden.rnak'" in capsys.readouterr().err
    assert run.main(["--optimizer", "mfsgd", "--config", "{rank: 8}", "--dry-run"]) == 2
    assert "--config is not valid JSON" in capsys.readouterr().err


def test_run_py_rejects_an_unknown_optimizer():
    with pytest.raises(SystemExit):
        run.parse_args(["--optimizer", "lion"])


def test_constant_then_linear_cooldown():
    schedule = ScheduleConfig(kind="constant_cooldown", cooldown_frac=0.4)
    factors = [lr_factor(step, 100, schedule) for step in range(100)]
    assert factors[:60] == [1.0] * 60
    assert factors[70] == pytest.approx(30 / 40)
    assert factors[99] == pytest.approx(1 / 40)
    assert all(a > b for a, b in zip(factors[60:], factors[61:]))


def test_warmup_and_cosine_schedules():
    warm = ScheduleConfig(kind="constant_cooldown", warmup_steps=10, cooldown_frac=0.0)
    assert [lr_factor(s, 100, warm) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cosine = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_frac=0.1)
    assert lr_factor(10, 110, cosine) == pytest.approx(1.0)
    assert lr_factor(60, 110, cosine) == pytest.approx(0.55)
    assert lr_factor(110, 110, cosine) == pytest.approx(0.1)
