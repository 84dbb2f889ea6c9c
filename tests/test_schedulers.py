"""Scheduler kwargs: refused at parse time when they would fail, and the authors' WSD `cooldown_ratio` as steps."""

import pytest
from lf_helpers import assert_ok, log_history, run_cli, tiny_config
from llamafactory.hparams import get_train_args

from llamafactory_mfsgd.schedulers import lr_factors

WSD = {"lr_scheduler_type": "warmup_stable_decay"}


@pytest.fixture()
def base(tmp_path):
    return tiny_config("tiny_sft_adamw.yaml", tmp_path / "no-model-needed", tmp_path / "out")


@pytest.mark.parametrize(
    "change,message",
    [
        ({**WSD, "lr_scheduler_kwargs": {"stable_ratio": 0.3}}, "unexpected keyword argument 'stable_ratio'"),
        ({**WSD, "lr_scheduler_kwargs": {"decay_ratio": 0.3}}, "unexpected keyword argument 'decay_ratio'"),
        ({**WSD, "lr_scheduler_kwargs": {"decay_type": "exp"}}, "Unknown decay type"),
        ({**WSD, "lr_scheduler_kwargs": {"cooldown_ratio": 1.5}}, "Invalid `cooldown_ratio: 1.5`"),
        ({**WSD, "lr_scheduler_kwargs": {"cooldown_ratio": 0.4, "num_decay_steps": 3}}, "remove \\['num_decay_steps'"),
        ({**WSD, "warmup_ratio": 0.7, "lr_scheduler_kwargs": {"cooldown_ratio": 0.4}}, "exceed the whole run"),
        ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"cooldown_ratio": 0.4}}, "not `cosine`"),
        ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}, "accepts: num_cycles"),
        ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"num_cycles": 0.5}}, "min_lr"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_scheduler_kwargs_that_would_fail_are_refused_at_parse_time(base, change, message):
    with pytest.raises(ValueError, match=message.replace("`", "`?")):
        get_train_args({**base, **change})


@pytest.mark.parametrize(
    "change",
    [
        {**WSD, "warmup_ratio": 0.0, "lr_scheduler_kwargs": {"cooldown_ratio": 0.4}},
        {**WSD, "lr_scheduler_kwargs": {"num_decay_steps": 10, "decay_type": "linear"}},
        {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}},
    ],
)
def test_valid_scheduler_kwargs_parse_unchanged(base, change):
    _, _, training_args, _, _ = get_train_args({**base, **change})
    assert training_args.lr_scheduler_kwargs == change["lr_scheduler_kwargs"]


def test_cooldown_ratio_becomes_decay_and_stable_steps_at_scheduler_creation(base):
    _, _, training_args, _, _ = get_train_args(
        {**base, **WSD, "warmup_ratio": 0.1, "lr_scheduler_kwargs": {"cooldown_ratio": 0.4, "decay_type": "linear"}}
    )
    lrs = lr_factors(training_args, 100)  # through the patched create_custom_scheduler, as trainers call it
    assert training_args.lr_scheduler_kwargs == {"decay_type": "linear", "num_decay_steps": 40, "num_stable_steps": 50}
    assert lrs[:10] == pytest.approx([i / 10 for i in range(10)])
    assert lrs[10:60] == [1.0] * 50
    assert lrs[60:] == pytest.approx([1 - i / 40 for i in range(40)])


@pytest.mark.slow
def test_authors_wsd_config_trains_through_llamafactory(tiny_model, tmp_path):
    """`warmup_stable_decay` + `cooldown_ratio: 0.4` (the authors' coding config) trains; the lr decays at the end."""
    config = tiny_config(
        "tiny_sft_adamw.yaml",
        tiny_model,
        tmp_path / "out",
        max_steps=10,
        save_steps=10,
        warmup_ratio=0.0,
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"cooldown_ratio": 0.4},
    )
    assert_ok(run_cli(config, tmp_path))
    lrs = [entry["learning_rate"] for entry in log_history(tmp_path / "out")]
    peak = config["learning_rate"]
    # 6 stable steps, then 4 cosine decay steps starting from the peak (HF logs the rate each step used)
    assert lrs[:7] == pytest.approx([peak] * 7)
    assert all(later < earlier for earlier, later in zip(lrs[6:], lrs[7:]))
    assert lrs[-1] < 0.2 * peak
