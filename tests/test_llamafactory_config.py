"""Parse-time behaviour of the extension inside LLaMA-Factory: keys, clear errors, configs, template, grad norm."""

import types

import llamafactory.hparams.parser as lf_parser
import llamafactory.train.trainer_utils  # noqa: F401  (applies the trainer patch)
import pytest
import torch
import yaml
from lf_helpers import CONFIGS, REPO, conversation, encode_with_template, run_cli, tiny_config
from llamafactory.hparams import get_train_args

from llamafactory_mfsgd.arguments import FROM_TRAINING_ARGUMENTS, OPTION_OF_KEY, optimizer_options
from mofasgd import DEFAULTS, MoFaSGD


@pytest.fixture()
def base(tmp_path):
    return tiny_config("tiny_sft_mfsgd.yaml", tmp_path / "no-model-needed", tmp_path / "out")


def test_parser_accepts_mfsgd_keys_and_fills_them(base):
    _, _, training_args, finetuning_args, _ = get_train_args(base)
    assert finetuning_args.use_mfsgd and finetuning_args.mfsgd_rank == base["mfsgd_rank"]
    assert finetuning_args.learning_rate_mfsgd == base["learning_rate_mfsgd"]
    assert training_args.learning_rate == base["learning_rate"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"finetuning_type": "lora"}, "finetuning_type: lora"),
        ({"finetuning_type": "freeze"}, "finetuning_type: freeze"),
        ({"use_galore": True, "optim": "adamw_torch"}, "use_galore"),
        ({"use_apollo": True}, "use_apollo"),
        ({"use_muon": True}, "use_muon"),
        ({"deepspeed": "ds_z2.json"}, "DeepSpeed"),
        ({"fsdp": "full_shard"}, "FSDP1 hands the optimizer flattened.*`fsdp_version: 2`.*plain DDP"),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "under FSDP1"),
        ({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}, "applies FSDP on GPUs only.*MFSGD_CPU_FSDP2"),
        (
            {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}, "mfsgd_fused": False},
            "mfsgd_fused: false` does not run under FSDP2",
        ),
        (
            {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}, "mfsgd_adamw_side": "compact"},
            "mfsgd_adamw_state: factored_no_momentum` .* does not run under FSDP2",
        ),
        (
            {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}, "mfsgd_adamw_state": "factored"},
            "mfsgd_adamw_state: factored` .* does not run under FSDP2",
        ),
        ({"fp16": True}, "fp16"),
        ({"mfsgd_fused_adamw_side": True, "mfsgd_fused": False}, "fused_adamw_side=True .* needs fused=True"),
        ({"mfsgd_adamw_state": "8bit"}, "mfsgd_adamw_state"),
        ({"mfsgd_adamw_side": "compact", "mfsgd_adamw_state": "full"}, "preset or the two keys, not both"),
        ({"mfsgd_adamw_side": "small"}, "mfsgd_adamw_side"),
        ({"mfsgd_rank": 0}, "mfsgd_rank"),
        ({"mfsgd_beta": 1.0}, "mfsgd_beta"),
        ({"learning_rate_mfsgd": -1.0}, "learning_rate_mfsgd"),
        ({"mfsgd_eta2": 0.5}, "mfsgd_eta2"),
        ({"mfsgd_beta_warmup_steps": 10}, "mfsgd_beta_start"),
        ({"mfsgd_init": "svd"}, "mfsgd_init"),
        ({"mfsgd_rnak": 8}, "Did you mean `mfsgd_rank`"),
        ({"learning_rate_adam": 1e-3}, "Did you mean `learning_rate_adamw`"),
        ({"profile_memory_stop_stpe": 2}, "Did you mean `profile_memory_stop_step`"),
        ({"galore_fused": True}, "use_galore"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_bad_configs_fail_at_parse_time_with_one_clear_message(base, change, message):
    with pytest.raises(ValueError, match=message.replace("`", "`?").replace("(", r"\(")):
        get_train_args({**base, **change})


def test_fused_galore_with_fp16_loss_scaling_is_refused(tmp_path):
    galore = tiny_config("tiny_sft_galore.yaml", tmp_path / "no-model-needed", tmp_path / "out", galore_fused=True)
    get_train_args(galore)  # the same config in fp32 parses
    with pytest.raises(ValueError, match="`fp16: true` scales the loss, and `galore_fused: true`"):
        get_train_args({**galore, "fp16": True})


def test_mfsgd_key_typo_is_caught_even_without_use_mfsgd(base):
    base.pop("use_mfsgd")
    with pytest.raises(ValueError, match="mfsgd_beta"):
        get_train_args({**base, "mfsgd_bta": 0.5})


def test_every_mofasgd_option_is_a_yaml_key_or_comes_from_the_training_arguments():
    """A new MoFaSGD constructor option fails here until it gets an `mfsgd_<option>` key (or is listed as set from
    the training arguments); the key's default and range checks then come from the optimizer."""
    assert set(OPTION_OF_KEY.values()) | set(FROM_TRAINING_ARGUMENTS) == set(DEFAULTS)
    assert not set(OPTION_OF_KEY.values()) & set(FROM_TRAINING_ARGUMENTS)


def test_yaml_key_defaults_are_the_optimizer_defaults(base):
    base = {k: v for k, v in base.items() if k not in OPTION_OF_KEY}
    _, _, _, finetuning_args, _ = get_train_args(base)
    assert optimizer_options(finetuning_args) == {option: DEFAULTS[option] for option in OPTION_OF_KEY.values()}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_with_the_real_parser(path):
    """The 8B configs need a GPU (pure_bf16) and the hub, so only the argument parsing runs for them."""
    with open(path) as f:
        config = yaml.safe_load(f)
    config["dataset_dir"] = str(REPO / "data")
    if config.get("bf16") and not torch.cuda.is_available():
        config["use_cpu"] = True  # HF refuses bf16 on a machine without a bf16 GPU unless told it is a CPU run
    _, _, training_args, finetuning_args, _ = lf_parser._parse_train_args(config)
    assert finetuning_args.use_mfsgd == ("mfsgd" in path.name)
    if "mfsgd" in path.name:
        assert finetuning_args.mfsgd_rank == 8
        assert finetuning_args.learning_rate_mfsgd > 0 and finetuning_args.learning_rate_adamw > 0
    if path.name.startswith("llama3.1_8b"):
        assert config["template"] == "tulu_v3" and config["cutoff_len"] == 1024
        assert training_args.per_device_train_batch_size == 1 and training_args.gradient_accumulation_steps == 8
        for key in ("profile_memory_from_start", "profile_memory_stop_step", "profile_memory_max_entries"):
            assert key in config


def test_tulu_v3_template_is_registered_and_renders_the_tulu_format(tiny_model):
    messages = conversation("2+2?", "4", "3+3?", "6")
    tokenizer, pairs = encode_with_template(tiny_model, "tulu_v3", messages, system="Be brief.")
    text = "".join(tokenizer.decode(p + a) for p, a in pairs)
    eos = tokenizer.eos_token
    expected = f"<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n4{eos}\n<|user|>\n3+3?\n<|assistant|>\n6{eos}\n"
    assert text.removeprefix(tokenizer.bos_token or "") == expected


def test_trainer_grad_norm_and_clipping_go_through_mofasgd():
    from transformers import Trainer

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(12, 8))
    bias = torch.nn.Parameter(torch.randn(8))
    optimizer = MoFaSGD([{"params": [weight]}, {"params": [bias], "mofasgd": False}], rank=2)
    ((weight * torch.randn(12, 8) * 50).sum() + (bias * torch.randn(8)).sum()).backward()
    assert weight.grad is None
    trainer = types.SimpleNamespace(
        optimizer=types.SimpleNamespace(optimizer=optimizer),
        accelerator=types.SimpleNamespace(unscale_gradients=lambda: None),  # no fp16 loss scaler
        args=types.SimpleNamespace(),
    )
    trainer.args.max_grad_norm = 0.5
    full = float(optimizer.grad_norm())
    assert float(Trainer._get_grad_norm(trainer, None)) == pytest.approx(full)
    assert float(Trainer._clip_grad_norm(trainer, None)) == pytest.approx(full)
    assert float(optimizer.grad_norm()) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.slow
def test_switched_off_extension_refuses_mfsgd_config_even_with_allow_extra_args(tmp_path, base):
    for extra in ({"LLAMAFACTORY_MFSGD": "0"}, {"LLAMAFACTORY_MFSGD": "0", "ALLOW_EXTRA_ARGS": "1"}):
        proc = run_cli(base, tmp_path, extra_env=extra, timeout=300)
        assert proc.returncode != 0
        assert "MoFaSGD extension is switched off" in proc.stdout
        assert not (tmp_path / "out" / "trainer_state.json").exists()


@pytest.mark.parametrize("saved_with_fsdp", [True, False])
def test_resuming_across_engines_is_refused_at_parse_time(base, tmp_path, monkeypatch, saved_with_fsdp):
    """A sharded FSDP2 checkpoint cannot resume without FSDP (no weights file), nor a DDP one under FSDP2."""
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    if saved_with_fsdp:
        (checkpoint / "pytorch_model_fsdp_0").mkdir()
        (checkpoint / "optimizer_0").mkdir()
        change, message = {}, "saved under FSDP2 as sharded DCP files.*accelerate merge-weights"
    else:
        (checkpoint / "model.safetensors").write_bytes(b"")
        monkeypatch.setenv("MFSGD_CPU_FSDP2", "1")
        change = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}
        message = "saved without FSDP.*this run uses FSDP2"
    with pytest.raises(ValueError, match=message):
        get_train_args({**base, **change, "resume_from_checkpoint": str(checkpoint)})


@pytest.mark.parametrize("preset,state,fused", [("compact", "factored_no_momentum", True), ("authors", "full", False)])
def test_the_adamw_side_preset_sets_both_keys(base, preset, state, fused):
    """`mfsgd_adamw_side` is one key between the shipped compact AdamW side and the authors' one."""
    finetuning_args = get_train_args({**base, "mfsgd_adamw_side": preset})[3]
    assert (finetuning_args.mfsgd_adamw_state, finetuning_args.mfsgd_fused_adamw_side) == (state, fused)
    assert optimizer_options(finetuning_args)["adamw_state"] == state


def test_the_shipped_8b_mfsgd_config_uses_the_compact_adamw_side():
    with open(CONFIGS / "llama3.1_8b_sft_mfsgd_lr.yaml") as f:
        assert yaml.safe_load(f)["mfsgd_adamw_side"] == "compact"
