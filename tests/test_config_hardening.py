"""Parse-time hardening (issue 22): the config checker reads YAML as training does; degenerate keys are caught."""

import logging
import types

import llamafactory.hparams.parser as lf_parser
import llamafactory.train.trainer_utils  # noqa: F401  (applies the extension's patches)
import pytest
import torch
import transformers.training_args as hf_training_args
import yaml
from lf_helpers import tiny_config
from llamafactory.hparams import get_train_args
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

from llamafactory_mfsgd.check_configs import check_one
from llamafactory_mfsgd.optimizer_factory import create_mfsgd_optimizer
from mofasgd import MoFaSGD


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


@pytest.mark.parametrize(
    "change,message",
    [
        ({"mfsgd_eta1": 0.0}, r"`mfsgd_eta1: 0.0`.*scales every MoFaSGD step to zero"),
        ({"mfsgd_max_value": 0.0}, r"`mfsgd_max_value: 0.0`.*min\(1/S, max_value\).*mfsgd_use_ones_for_nonzero_s"),
        ({"mfsgd_eps": 100.0}, r"`mfsgd_eps: 100.0`.*`max_grad_norm: 1.0`.*= 10\b"),
        ({"mfsgd_eps": 30.0, "max_grad_norm": 3.0, "mfsgd_beta": 0.5}, r"`mfsgd_eps: 30.0`.*= 6\b"),
        (
            {"mfsgd_eps": 12.0, "mfsgd_beta_start": 0.5, "mfsgd_beta_end": 0.9, "mfsgd_beta_warmup_steps": 10},
            r"`mfsgd_eps: 12.0`.*= 10\b",
        ),
        ({"mfsgd_eps": float("inf"), "max_grad_norm": 0.0}, r"`mfsgd_eps: inf`"),
    ],
    ids=["eta1", "max_value", "eps", "eps_clip_beta", "eps_warmup", "eps_inf"],
)
def test_settings_that_freeze_every_matrix_are_refused_at_parse_time(base, change, message):
    with pytest.raises(ValueError, match=message + r".*, so every MoFaSGD matrix would stay frozen") as error:
        get_train_args({**base, **change})
    assert "(the default)" in str(error.value) and "finetuning_type: freeze" in str(error.value)


@pytest.mark.parametrize("init", ["gradient", "weight"])
def test_the_eps_bound_is_tight_a_coherent_clipped_gradient_moves_a_matrix_only_below_it(init):
    """max_grad_norm / (1 - beta) bounds S under clipping; the most coherent gradient (constant, rank one) nears it."""
    ceiling = 1.0 / (1 - 0.9)
    torch.manual_seed(0)
    gradient = 50 * torch.randn(24, 1) @ torch.randn(1, 16)
    moves = {}
    for eps in (1.01 * ceiling, 0.9 * ceiling):
        torch.manual_seed(0)
        w = torch.nn.Parameter(0.1 * torch.randn(24, 16))
        optimizer = MoFaSGD([w], lr=1e-3, rank=4, beta=0.9, eps=eps, init=init, fused=False)
        moves[eps] = 0
        for _ in range(150):
            before = w.detach().clone()
            w.grad = gradient.clone()
            optimizer.clip_grad_norm_(1.0)
            optimizer.step()
            moves[eps] += bool((w.detach() != before).any())
    assert moves == {1.01 * ceiling: 0, 0.9 * ceiling: pytest.approx(150, abs=30)}


@pytest.mark.parametrize(
    "change",
    [
        {"mfsgd_max_value": 0.0, "mfsgd_use_ones_for_nonzero_s": True},  # the spectral step does not read it
        {"mfsgd_eta1": 0.0, "mfsgd_eta2": 0.5, "mfsgd_fused": False},  # the complement step still moves them
        {"mfsgd_eps": 100.0, "max_grad_norm": 0.0},  # no clipping: no bound on the momentum's singular values
        {"mfsgd_eps": 9.0},  # below max_grad_norm / (1 - beta) = 10
    ],
)
def test_settings_that_still_move_the_matrices_parse(base, change):
    get_train_args({**base, **change})


def test_stochastic_rounding_on_fp32_weights_warns_that_it_has_no_effect(base, lf_log):
    get_train_args({**base, "mfsgd_stochastic_rounding": False})
    get_train_args(base)
    assert not [w for w in _warnings(lf_log) if "stochastic_rounding" in w]
    get_train_args({**base, "mfsgd_stochastic_rounding": True})
    (warning,) = [w for w in _warnings(lf_log) if "mfsgd_stochastic_rounding: true" in w]
    assert "fp32" in warning and "no effect" in warning and "pure_bf16: true" in warning


def test_a_rounding_kernel_on_a_run_that_rounds_nothing_warns_and_the_key_reaches_the_optimizer(base, lf_log):
    from llamafactory_mfsgd.arguments import optimizer_options

    get_train_args(base)
    assert not [w for w in _warnings(lf_log) if "rounding_kernel" in w]
    *_, finetuning_args, _ = get_train_args({**base, "mfsgd_rounding_kernel": "compiled"})
    (warning,) = [w for w in _warnings(lf_log) if "mfsgd_rounding_kernel: compiled" in w]
    assert "no effect" in warning and "pure_bf16: true" in warning
    assert optimizer_options(finetuning_args)["rounding_kernel"] == "compiled"
    with pytest.raises(ValueError, match="mfsgd_rounding_kernel"):
        get_train_args({**base, "mfsgd_rounding_kernel": "triton"})


def _tiny_llama():
    torch.manual_seed(0)
    shapes = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    return LlamaForCausalLM(LlamaConfig(**shapes, num_key_value_heads=2, head_dim=8))  # k/v_proj: 16 x 32


def test_a_rank_above_some_matrices_size_warns_naming_them_and_their_rank(base, lf_log):
    _, _, training_args, finetuning_args, _ = get_train_args({**base, "mfsgd_rank": 24})
    create_mfsgd_optimizer(_tiny_llama(), training_args, finetuning_args).remove_hooks()
    (warning,) = [w for w in _warnings(lf_log) if "mfsgd_rank: 24" in w]
    assert "4 of the 14 MoFaSGD matrices" in warning
    assert "4 of shape 16x32 (e.g. `model.layers.0.self_attn.k_proj.weight`) keep rank 16" in warning
    assert "q_proj" not in warning and "mlp" not in warning


def test_a_rank_within_every_matrix_does_not_warn(base, lf_log):
    _, _, training_args, finetuning_args, _ = get_train_args({**base, "mfsgd_rank": 16})
    create_mfsgd_optimizer(_tiny_llama(), training_args, finetuning_args).remove_hooks()
    assert not [w for w in _warnings(lf_log) if "mfsgd_rank" in w]


def _resuming_trainer(optimizer):
    """What HF Trainer._load_optimizer_and_scheduler reads from `self` in a plain single-process run."""
    return types.SimpleNamespace(
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        args=types.SimpleNamespace(world_size=1, device=torch.device("cpu")),
        is_deepspeed_enabled=False,
        is_fsdp_enabled=False,
        is_fsdp_xla_v1_enabled=False,
    )


@pytest.mark.parametrize("with_scheduler", [True, False], ids=["scheduler_saved", "save_cut_before_scheduler"])
@pytest.mark.parametrize("kept", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_a_truncated_optimizer_file_is_named_as_damaged_on_resume(tmp_path, kept, with_scheduler):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(32))]
    optimizer = MoFaSGD([{"params": params[:3]}, {"params": params[3:], "mofasgd": False}], rank=4)
    sum((p * torch.randn_like(p)).sum() for p in params).backward()
    optimizer.step()
    ckpt = tmp_path / "checkpoint-7"
    ckpt.mkdir()
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    if with_scheduler:
        torch.save(_resuming_trainer(optimizer).lr_scheduler.state_dict(), ckpt / "scheduler.pt")
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(ValueError, match="damaged") as error:
        Trainer._load_optimizer_and_scheduler(_resuming_trainer(optimizer), str(ckpt))
    message = str(error.value)
    assert str(ckpt / "optimizer.pt") in message and "earlier checkpoint" in message
