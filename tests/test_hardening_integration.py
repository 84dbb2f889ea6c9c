"""Issue 9, LLaMA-Factory side: resume mismatches, strict value types, fp16 unscaling, null profiling keys, run.py."""

import logging
import re
import subprocess
import sys
import types

import llamafactory.train.trainer_utils  # noqa: F401  (applies the trainer patches)
import pytest
import torch
from accelerate import Accelerator
from lf_helpers import REPO, log_history, run_cli, tiny_config, weights
from llamafactory.hparams import get_train_args
from omegaconf import OmegaConf
from transformers import Trainer

from llamafactory_mfsgd import launcher, lf_tuner
from llamafactory_mfsgd.memory_snapshot import MemorySnapshotSession
from mofasgd import MoFaSGD


@pytest.fixture()
def base(tmp_path):
    return tiny_config("tiny_sft_mfsgd.yaml", tmp_path / "no-model-needed", tmp_path / "out")


@pytest.fixture()
def lf_log(caplog):
    """Records LLaMA-Factory's logger (it does not propagate to the root logger that caplog watches)."""
    lf_logger = logging.getLogger("llamafactory")
    lf_logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    lf_logger.removeHandler(caplog.handler)


# ---------------------------------------------------------------- item 3: resume with another optimizer / routing


def _params(n_matrices=2, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(12, 8)) for _ in range(n_matrices)] + [torch.nn.Parameter(torch.randn(8))]


def _train_one_step(optimizer, params):
    sum((p * torch.randn_like(p)).sum() for p in params).backward()
    optimizer.step()
    optimizer.zero_grad()


def _mofasgd(params, n_managed):
    return MoFaSGD([{"params": params[:n_managed]}, {"params": params[n_managed:], "mofasgd": False}], rank=2, lr=1e-2)


def _adamw(params):
    return torch.optim.AdamW([{"params": params[:-1]}, {"params": params[-1:], "weight_decay": 0.0}], lr=1e-2)


def _checkpoint(tmp_path, optimizer, with_optimizer=True):
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if with_optimizer:
        torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
        torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    return ckpt


def _resuming_trainer(optimizer, **extra):
    """What HF Trainer._load_optimizer_and_scheduler reads from `self` in a plain single-process run."""
    return types.SimpleNamespace(
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        args=types.SimpleNamespace(world_size=1, device=torch.device("cpu")),
        is_deepspeed_enabled=False,
        is_fsdp_enabled=False,
        is_fsdp_xla_v1_enabled=False,
        **extra,
    )


def test_adamw_run_resuming_a_mofasgd_checkpoint_says_use_mfsgd_changed(tmp_path):
    params = _params()
    saved = _mofasgd(params, 2)
    _train_one_step(saved, params)
    ckpt = _checkpoint(tmp_path, saved)
    with pytest.raises(ValueError, match=r"MoFaSGD.*`use_mfsgd: false`") as error:
        Trainer._load_optimizer_and_scheduler(_resuming_trainer(_adamw(_params())), str(ckpt))
    assert str(ckpt) in str(error.value) and "use_mfsgd: true" in str(error.value)


def test_mofasgd_run_resuming_an_adamw_checkpoint_says_use_mfsgd_changed(tmp_path):
    params = _params()
    saved = _adamw(params)
    _train_one_step(saved, params)
    ckpt = _checkpoint(tmp_path, saved)
    with pytest.raises(ValueError, match=r"`use_mfsgd: true`.*not by MoFaSGD"):
        Trainer._load_optimizer_and_scheduler(_resuming_trainer(_mofasgd(_params(), 2)), str(ckpt))


def test_mofasgd_resume_with_other_routing_says_mfsgd_target_changed(tmp_path):
    params = _params()
    saved = _mofasgd(params, 2)
    _train_one_step(saved, params)
    ckpt = _checkpoint(tmp_path, saved)
    trainer = _resuming_trainer(_mofasgd(_params(), 1), finetuning_args=types.SimpleNamespace(mfsgd_target="q_proj"))
    with pytest.raises(ValueError, match=r"2 matrices.*1 matri.*`mfsgd_target`.*q_proj"):
        Trainer._load_optimizer_and_scheduler(trainer, str(ckpt))


def test_matching_mofasgd_checkpoint_still_loads(tmp_path):
    params = _params()
    saved = _mofasgd(params, 2)
    _train_one_step(saved, params)
    ckpt = _checkpoint(tmp_path, saved)
    resumed = _mofasgd([torch.nn.Parameter(p.detach().clone()) for p in params], 2)
    Trainer._load_optimizer_and_scheduler(_resuming_trainer(resumed), str(ckpt))
    assert [set(s) for s in resumed.state.values()] == [set(s) for s in saved.state.values()]


# ---------------------------------------------------------------- item 7: resume without optimizer state


def test_resume_from_a_checkpoint_without_optimizer_state_warns_that_mofasgd_starts_from_scratch(tmp_path, lf_log):
    optimizer = _mofasgd(_params(), 2)
    ckpt = _checkpoint(tmp_path, optimizer, with_optimizer=False)
    Trainer._load_optimizer_and_scheduler(_resuming_trainer(optimizer), str(ckpt))
    warnings = [r.getMessage() for r in lf_log.records if r.levelno == logging.WARNING]
    assert any("no optimizer state" in w and "save_only_model" in w and "from scratch" in w for w in warnings)
    assert any("MoFaSGD" in w for w in warnings)


def test_fsdp2_resume_from_a_checkpoint_without_optimizer_0_warns_that_mofasgd_starts_from_scratch(tmp_path, lf_log):
    """Issue 22 item 6: an FSDP2 checkpoint (sharded weights, scheduler.pt) whose optimizer_0/ is gone."""
    optimizer = _mofasgd(_params(), 2)
    ckpt = _checkpoint(tmp_path, optimizer)
    (ckpt / "optimizer.pt").unlink()  # FSDP writes accelerate's optimizer_0/ (sharded) or optimizer.bin instead
    (ckpt / "pytorch_model_fsdp_0").mkdir()
    plugin = types.SimpleNamespace(fsdp_version=2)
    trainer = _resuming_trainer(optimizer)
    trainer.is_fsdp_enabled = True
    trainer.accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin))
    Trainer._load_optimizer_and_scheduler(trainer, str(ckpt))
    warnings = [r.getMessage() for r in lf_log.records if r.levelno == logging.WARNING]
    assert any("no optimizer state" in w and "no optimizer_0/" in w and "from scratch" in w for w in warnings)
    assert any("MoFaSGD" in w for w in warnings)


def test_the_fsdp2_final_save_is_patched_and_pinned_to_the_transformers_code_it_completes():
    """Issue 22 item 1 (the run itself: tests/test_llamafactory_fsdp2.py): a moved upstream branch fails loudly."""
    from llamafactory_mfsgd import hf_trainer
    from llamafactory_mfsgd.compat import require_source

    assert getattr(Trainer.save_model, "__mfsgd_patched__", False)
    require_source(Trainer._save, "save_pretrained")
    with pytest.raises(RuntimeError, match=r"_is_final_save no longer contains \['FULL_STATE_DICT'\]"):
        require_source(hf_trainer._is_final_save, "FULL_STATE_DICT")


def test_resume_with_optimizer_state_does_not_warn(tmp_path, lf_log):
    params = _params()
    saved = _mofasgd(params, 2)
    _train_one_step(saved, params)
    ckpt = _checkpoint(tmp_path, saved)
    Trainer._load_optimizer_and_scheduler(_resuming_trainer(_mofasgd(_params(), 2)), str(ckpt))
    assert not [r for r in lf_log.records if "no optimizer state" in r.getMessage()]


# ---------------------------------------------------------------- item 4: strict types for every extension key


@pytest.mark.parametrize(
    "key,value",
    [
        ("use_mfsgd", "no"),
        ("use_mfsgd", "false"),
        ("use_mfsgd", 1),
        ("mfsgd_fused", "false"),
        ("mfsgd_nesterov", "yes"),
        ("learning_rate_mfsgd", "0.01"),
        ("learning_rate_adamw", True),
        ("mfsgd_rank", True),
        ("mfsgd_rank", "8"),
        ("mfsgd_rank", 8.0),
        ("mfsgd_beta", "0.9"),
        ("mfsgd_beta_start", False),
        ("mfsgd_beta_warmup_steps", 1.5),
        ("mfsgd_init", 1),
        ("mfsgd_init", "svd"),
        ("mfsgd_target", ["q_proj", "v_proj"]),
        ("profile_memory_from_start", "true"),
        ("profile_memory_stop_step", "3"),
        ("galore_fused", 0),
    ],
    ids=lambda v: repr(v),
)
def test_mistyped_extension_values_are_refused_at_parse_time_naming_the_key(base, key, value):
    with pytest.raises(ValueError, match=rf"`{key}: ") as error:
        get_train_args({**base, key: value})
    assert repr(value) in str(error.value) or str(value) in str(error.value)


def test_quoted_boolean_is_refused_even_on_the_command_line(base):
    argv = []
    for key, value in {**base, "mfsgd_rank": "true"}.items():
        argv += [f"--{key}", str(value)]
    with pytest.raises(ValueError, match="`mfsgd_rank: True`.*integer"):
        get_train_args(argv)


@pytest.mark.parametrize(
    "change",
    [
        {"learning_rate_mfsgd": 1},  # a YAML integer is a fine float
        {"learning_rate_mfsgd": None, "learning_rate_adamw": None},  # Optional accepts null
        {"mfsgd_beta_start": None, "mfsgd_beta_end": None},
        {"use_mfsgd": True, "mfsgd_fused": False, "mfsgd_init": "gradient", "mfsgd_target": "q_proj,v_proj"},
    ],
)
def test_well_typed_values_still_parse(base, change):
    _, _, _, finetuning_args, _ = get_train_args({**base, **change})
    for key, value in change.items():
        assert getattr(finetuning_args, key) == value


def test_memory_session_refuses_a_quoted_boolean(tmp_path):
    with pytest.raises(ValueError, match="`profile_memory_from_start: 'yes'`"):
        lf_tuner._memory_session({"profile_memory_from_start": "yes", "output_dir": str(tmp_path)})


def test_run_py_reads_scalars_like_llamafactory_cli():
    """One rule: a `key=value` override means what the same text means to `llamafactory-cli train CFG key=value`."""
    samples = ["no", "yes", "off", "true", "False", "null", "~", "8", "-3", "1e-5", "1.0e-5", "0.01", "abc", "a,b"]
    expected = OmegaConf.to_container(OmegaConf.from_cli([f"k{i}={s}" for i, s in enumerate(samples)]))
    assert [launcher.parse_scalar(s) for s in samples] == [expected[f"k{i}"] for i in range(len(samples))]


def test_startup_log_prints_the_effective_values(base, tiny_model, lf_log):
    from transformers import AutoModelForCausalLM

    from llamafactory_mfsgd.optimizer_factory import create_mfsgd_optimizer

    change = {"mfsgd_fused": False, "mfsgd_rank": 3, "mfsgd_beta": 0.8, "mfsgd_init": "gradient"}
    change["mfsgd_min_gradient_support"] = 0.01  # issue 22, item 8: the guard's key reaches the optimizer
    _, _, training_args, finetuning_args, _ = get_train_args({**base, **change, "mfsgd_target": "q_proj,v_proj"})
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    optimizer = create_mfsgd_optimizer(model, training_args, finetuning_args)
    optimizer.remove_hooks()
    (line,) = [r.getMessage() for r in lf_log.records if "Using MoFaSGD" in r.getMessage()]
    for text in ("rank=3", "beta=0.8", "fused=False", "init=gradient", "target=q_proj,v_proj", "lr=0.01"):
        assert text in line, (text, line)
    assert optimizer.param_groups[0]["min_gradient_support"] == 0.01
    for text in ("min_gradient_support=0.01",):
        assert text in line, (text, line)


# ---------------------------------------------------------------- item 5: fp16 loss scaling with mfsgd_fused: false

SCALE = 1024.0


def _fp16_setup(scaled: bool):
    """A non-fused MoFaSGD optimizer whose gradients come from a loss scaled like accelerate's fp16 GradScaler."""
    params = _params()
    optimizer = MoFaSGD([{"params": params[:2]}, {"params": params[2:], "mofasgd": False}], rank=2, fused=False)
    torch.manual_seed(1)
    loss = sum((p * torch.randn_like(p) * 30).sum() for p in params)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE) if scaled else None
    (scaler.scale(loss) if scaled else loss).backward()
    # accelerate's own unscale_gradients, on an accelerator that holds a loss scaler (CPU accelerate has none)
    accelerator = types.SimpleNamespace(
        native_amp=scaled, mixed_precision="fp16", scaler=scaler, _optimizers=[optimizer], distributed_type="NO"
    )
    accelerator.unscale_gradients = types.MethodType(Accelerator.unscale_gradients, accelerator)
    return params, optimizer, scaler, accelerator


def _step(optimizer, scaler):
    if scaler is None:
        optimizer.step()
    else:  # what accelerate's AcceleratedOptimizer.step does with a scaler
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0])
def test_fp16_non_fused_gradients_are_unscaled_before_mofasgd_clips_and_logs(max_grad_norm):
    results = {}
    for scaled in (False, True):
        params, optimizer, scaler, accelerator = _fp16_setup(scaled)
        trainer = types.SimpleNamespace(
            optimizer=types.SimpleNamespace(optimizer=optimizer),
            accelerator=accelerator,
            args=types.SimpleNamespace(max_grad_norm=max_grad_norm),
        )
        grad_norm = Trainer._clip_grad_norm(trainer, None) if max_grad_norm > 0 else None
        grad_norm = Trainer._get_grad_norm(trainer, None, grad_norm=grad_norm)
        _step(optimizer, scaler)
        results[scaled] = float(grad_norm), [p.detach().clone() for p in params]
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for scaled_param, plain_param in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(scaled_param, plain_param, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- item 10: null profiling stops mean the defaults


def test_null_profile_memory_stops_parse_as_the_defaults(base):
    change = {"profile_memory_stop_step": None, "profile_memory_stop_accumulation_step": None}
    _, _, _, finetuning_args, _ = get_train_args({**base, **change})
    assert finetuning_args.profile_memory_stop_step == 1
    assert finetuning_args.profile_memory_stop_accumulation_step == 0


def test_memory_session_accepts_null_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(MemorySnapshotSession, "start", lambda self: None)
    values = {
        "profile_memory_from_start": True,
        "profile_memory_stop_step": None,
        "profile_memory_stop_accumulation_step": None,
        "profile_memory_max_entries": None,
        "output_dir": str(tmp_path),
    }
    session = lf_tuner._memory_session(values)
    assert (session.stop_step, session.stop_accumulation_step, session.max_entries) == (1, 0, 1_000_000)
    direct = MemorySnapshotSession(str(tmp_path), stop_step=None, stop_accumulation_step=None, device="cpu")
    assert (direct.stop_step, direct.stop_accumulation_step) == (1, 0)


# ---------------------------------------------------------------- run.py and setup.py


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text,message",
    [
        ("model_name_or_path: m\nmfsgd_rank: 4\nuse_mfsgd: true\nmfsgd_rank: 8\n", r"`mfsgd_rank`.*line 4"),
        ("", r"empty"),
        ("# only a comment\n", r"empty"),
        ("- use_mfsgd: true\n- mfsgd_rank: 8\n", r"a list.*mapping"),
        ("model_name_or_path: m\nuse_mfsgd: 'no'\n", r"`use_mfsgd: 'no'`"),
    ],
    ids=["duplicate", "empty", "comment-only", "list", "quoted-bool"],
)
def test_run_py_refuses_bad_yaml_before_creating_any_directory(tmp_path, capsys, text, message):
    base_dir = tmp_path / "saves"
    with pytest.raises(SystemExit) as exit_info:
        launcher.main([str(_write(tmp_path, text)), "--base_output_dir", str(base_dir)])
    assert exit_info.value.code not in (0, None)
    assert re.search(message, str(exit_info.value.code) + capsys.readouterr().err)
    assert not base_dir.exists()


def test_run_py_without_arguments_prints_a_readable_usage(capsys):
    assert launcher.main([]) == 2
    err = capsys.readouterr().err
    assert "python run.py CONFIG.yaml" in err and "--ngpus" in err and "key=value" in err
    assert "required" not in err  # not argparse's "the following arguments are required: config, overrides"


def test_setup_py_refuses_and_names_pip_install():
    proc = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "pip install -e ." in proc.stdout + proc.stderr


# ---------------------------------------------------------------- end to end through llamafactory-cli


@pytest.mark.slow
def test_cli_adamw_resume_of_a_mofasgd_checkpoint_fails_naming_use_mfsgd(tiny_model, tmp_path):
    mfsgd = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "mfsgd", max_steps=3, save_steps=3)
    proc = run_cli(mfsgd, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ckpt = tmp_path / "mfsgd" / "checkpoint-3"
    adamw = tiny_config("tiny_sft_adamw.yaml", tiny_model, tmp_path / "adamw", resume_from_checkpoint=str(ckpt))
    proc = run_cli(adamw, tmp_path)
    assert proc.returncode != 0
    assert "`use_mfsgd: false`" in proc.stdout and "parameter group" not in proc.stdout
    assert not (tmp_path / "adamw" / "checkpoint-6").exists()


@pytest.mark.slow
def test_cli_resume_after_save_only_model_warns_that_momentum_starts_from_scratch(tiny_model, tmp_path):
    first = tiny_config(
        "tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "first", max_steps=3, save_steps=3, save_only_model=True
    )
    proc = run_cli(first, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ckpt = tmp_path / "first" / "checkpoint-3"
    assert not (ckpt / "optimizer.pt").exists()
    resumed = dict(first, output_dir=str(tmp_path / "resumed"), max_steps=4, resume_from_checkpoint=str(ckpt))
    proc = run_cli(resumed, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "no optimizer state" in proc.stdout and "from scratch" in proc.stdout


@pytest.mark.slow
def test_cli_resume_with_edited_hyperparameters_uses_and_logs_the_new_values(tiny_model, tmp_path):
    """Issue 22, item 5: the YAML's values win over the checkpoint's, the scheduler's base lr included."""
    first = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "first", learning_rate_mfsgd=0.01)
    proc = run_cli(first, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ckpt = tmp_path / "first" / "checkpoint-3"
    edited = dict(
        first,
        output_dir=str(tmp_path / "edited"),
        resume_from_checkpoint=str(ckpt),
        learning_rate_mfsgd=0.02,
        mfsgd_beta=0.8,
        mfsgd_nesterov=True,
    )
    proc = run_cli(edited, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    for text in (
        "beta: 0.9 -> 0.8",
        "nesterov: False -> True",
        "lr (base, initial_lr) (MoFaSGD matrices): 0.01 -> 0.02",
    ):
        assert text in proc.stdout, text
    groups = torch.load(tmp_path / "edited" / "checkpoint-6" / "optimizer.pt", weights_only=True)["param_groups"]
    mfsgd = next(g for g in groups if g["mofasgd"])
    assert (mfsgd["beta"], mfsgd["nesterov"], mfsgd["initial_lr"]) == (0.8, True, 0.02)
    # the MoFaSGD group's lr (logged as learning_rate) follows the same schedule from twice the base
    before = [e["learning_rate"] for e in log_history(tmp_path / "first")][3:]
    after = [e["learning_rate"] for e in log_history(tmp_path / "edited")][-3:]
    assert after == pytest.approx([2 * lr for lr in before], rel=1e-6)


# ---------------------------------------------------------------- issue 22, item 10: gradient init on several ranks


def _init_check(init, fsdp, monkeypatch):
    from llamafactory_mfsgd.checks import validate_with_training_args

    monkeypatch.setenv("MFSGD_CPU_FSDP2", "1")
    from dataclasses import asdict

    from llamafactory_mfsgd.arguments import MfsgdArguments

    defaults = asdict(MfsgdArguments())  # every mfsgd_* key at its default, then the ones this check is about
    finetuning = types.SimpleNamespace(
        **{**defaults, "galore_fused": False, "use_mfsgd": True, "mfsgd_fused": True, "mfsgd_init": init},
        pure_bf16=False,
    )
    training = types.SimpleNamespace(
        fp16=False, fsdp=fsdp, world_size=2, resume_from_checkpoint=None, max_grad_norm=1.0
    )
    validate_with_training_args(finetuning, training)


def test_gradient_init_is_accepted_under_ddp(monkeypatch):
    _init_check("gradient", [], monkeypatch)  # the ranks average the first gradient's sketches


def test_gradient_init_under_fsdp2_is_refused_at_parse_time_naming_the_key(monkeypatch):
    with pytest.raises(ValueError, match=r"`mfsgd_init: gradient` does not run under FSDP2.*`mfsgd_init: weight`"):
        _init_check("gradient", ["full_shard", "auto_wrap"], monkeypatch)
    _init_check("weight", ["full_shard", "auto_wrap"], monkeypatch)


@pytest.mark.slow
def test_cli_divergence_skips_the_non_finite_steps_and_saves_a_finite_model(tiny_model, tmp_path):
    """Issue 22, item 7: an AdamW-side lr of 1e30 makes every loss after step 1 NaN (HF logs it as 0)."""
    config = tiny_config(
        "tiny_sft_mfsgd.yaml",
        tiny_model,
        tmp_path / "out",
        max_steps=3,
        save_steps=10,
        learning_rate_adamw=1e30,
        warmup_ratio=0.0,
        max_grad_norm=0.0,  # no clipping: step() decides on its own
    )
    proc = run_cli(config, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert proc.stdout.count("MoFaSGD skipped this optimizer step") == 2, proc.stdout[-4000:]
    assert "`model.embed_tokens.weight` of shape" in proc.stdout or "and 16 more" in proc.stdout
    saved = weights(tmp_path / "out")
    assert [name for name, value in saved.items() if not torch.isfinite(value).all()] == []
