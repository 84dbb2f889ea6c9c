"""Parse-time hardening (issue 22): the config checker reads YAML as training does; degenerate keys are caught."""

import llamafactory.hparams.parser as lf_parser
import llamafactory.train.trainer_utils  # noqa: F401  (applies the extension's patches)
import pytest
import transformers.training_args as hf_training_args
import yaml
from lf_helpers import tiny_config
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
