"""Parse-time hardening (issue 22): the config checker reads YAML as training does; degenerate keys are caught."""

import logging

import llamafactory.hparams.parser as lf_parser
import llamafactory.train.trainer_utils  # noqa: F401  (applies the extension's patches)
import pytest
import transformers.training_args as hf_training_args
import yaml
from lf_helpers import tiny_config
from llamafactory.hparams import get_train_args
from omegaconf import OmegaConf

from llamafactory_mfsgd.check_configs import check_one


@pytest.fixture()
def base(tmp_path):
    return tiny_config("tiny_sft_mfsgd.yaml", tmp_path / "no-model-needed", tmp_path / "out")


# ---------------------------------------------------------------- item 9: mfsgd-check-configs reads YAML as training


@pytest.fixture()
def checker(monkeypatch, tmp_path):
    """check_one in this process; the bf16-GPU emulation it installs is undone after the test."""
    for module in (hf_training_args, lf_parser):
        monkeypatch.setattr(module, "is_torch_bf16_gpu_available", module.is_torch_bf16_gpu_available)
    return lambda path: check_one(str(path), None, None, str(tmp_path / "checked"))


def _yaml_with_lines(tmp_path, config: dict, *lines: str):
    """`config` as YAML, with `lines` appended verbatim (so they keep their exact spelling)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config) + "".join(f"{line}\n" for line in lines))
    return path


def test_the_checker_accepts_an_unquoted_exponent_number_as_training_does(base, tmp_path, checker):
    base.pop("learning_rate_mfsgd")
    path = _yaml_with_lines(tmp_path, base, "learning_rate_mfsgd: 1e-5")
    assert OmegaConf.load(path)["learning_rate_mfsgd"] == 1e-5  # what llamafactory-cli train reads
    assert checker(path).startswith("full/mfsgd")


def test_the_checker_refuses_a_duplicated_key_as_training_does(base, tmp_path, checker):
    base.pop("mfsgd_rank")
    path = _yaml_with_lines(tmp_path, base, "mfsgd_rank: 8", "mfsgd_rank: 16")
    with pytest.raises(yaml.YAMLError, match="duplicate key"):
        OmegaConf.load(path)  # llamafactory-cli train refuses it
    with pytest.raises(ValueError, match=r"duplicate key `mfsgd_rank`.*keep only one"):
        checker(path)


# ---------------------------------------------------------------- item 11: keys that do nothing or freeze the matrices


@pytest.fixture()
def lf_log(caplog):
    """Records LLaMA-Factory's logger (it does not propagate to the root logger that caplog watches)."""
    lf_logger = logging.getLogger("llamafactory")
    lf_logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    lf_logger.removeHandler(caplog.handler)


def _warnings(lf_log) -> list[str]:
    return [r.getMessage() for r in lf_log.records if r.levelno == logging.WARNING]


def test_optim_beside_use_mfsgd_warns_that_it_is_ignored(base, lf_log):
    get_train_args(base)
    assert not [w for w in _warnings(lf_log) if "optim" in w]
    get_train_args({**base, "optim": "adafactor"})
    (warning,) = [w for w in _warnings(lf_log) if "`optim: adafactor`" in w]
    assert "ignored" in warning and "-> MoFaSGD" in warning and "Remove `optim:`" in warning


def test_beta_warmup_keys_without_warmup_steps_are_refused(base):
    with pytest.raises(ValueError, match=r"mfsgd_beta_start.*mfsgd_beta_end.*`mfsgd_beta_warmup_steps`"):
        get_train_args({**base, "mfsgd_beta_start": 0.75, "mfsgd_beta_end": 0.95})
    with pytest.raises(ValueError, match=r"`mfsgd_beta_end: 0.95` .*`mfsgd_beta_warmup_steps`"):
        get_train_args({**base, "mfsgd_beta_end": 0.95})


def test_beta_warmup_keys_with_warmup_steps_zero_warn_that_beta_stays_constant(base, lf_log):
    change = {"mfsgd_beta_start": 0.75, "mfsgd_beta_end": 0.95, "mfsgd_beta_warmup_steps": 0, "mfsgd_beta": 0.8}
    get_train_args({**base, **change})
    (warning,) = [w for w in _warnings(lf_log) if "mfsgd_beta_warmup_steps: 0" in w]
    assert "0.75 -> 0.95" in warning and "0.8" in warning and "unused" in warning
