"""MoFaSGD under every LLaMA-Factory training stage (pt, sft, rm, dpo, kto; ppo refused): the stage trainers build
our optimizer and inherit the Trainer patches, every managed matrix moves, the projected backward equals the
gradient-hook path, checkpoints hold the factors, DPO/KTO resume exactly, and DPO's reference model stays apart."""

import math

import llamafactory.train.trainer_utils as trainer_utils
import pytest
import torch
from lf_helpers import CONFIGS, assert_ok, log_history, run_cli, tiny_config, weights
from llamafactory.hparams import get_train_args
from safetensors.torch import load_file
from transformers import Trainer

from llamafactory_mfsgd.diagnostics import unwrap_optimizer

STAGE_CONFIGS = {stage: f"tiny_{stage}_mfsgd.yaml" for stage in ("pt", "dpo", "kto", "rm")}
MATRICES = 7 * 2  # q, k, v, o, gate, up, down in each of the tiny LLaMA's 2 layers
# what each stage's loss is at step 1, where the policy still equals its frozen reference copy
FIRST_LOSS = {"dpo": math.log(2), "kto": 0.5}


def _stage_trainer_classes() -> dict[str, type]:
    from llamafactory.train.dpo.trainer import CustomDPOTrainer
    from llamafactory.train.kto.trainer import CustomKTOTrainer
    from llamafactory.train.pt.trainer import CustomTrainer
    from llamafactory.train.rm.trainer import PairwiseTrainer
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    return {
        "pt": CustomTrainer,
        "sft": CustomSeq2SeqTrainer,
        "rm": PairwiseTrainer,
        "dpo": CustomDPOTrainer,
        "kto": CustomKTOTrainer,
    }


def test_every_stage_trainer_builds_our_optimizer_and_inherits_the_trainer_patches():
    """TRL's DPOTrainer / KTOTrainer and LLaMA-Factory's own trainers all subclass transformers' Trainer, which the
    extension patches in place; none of them overrides the patched methods, and each imports the patched
    create_custom_optimizer (their `log` overrides end in Trainer.log: the runs below log MoFaSGD's diagnostics)."""
    import importlib

    assert trainer_utils.create_custom_optimizer.__module__ == "llamafactory_mfsgd.lf_trainer_utils"
    assert getattr(Trainer, "__mfsgd_patched__", False) and getattr(Trainer, "__mfsgd_resume_patched__", False)
    for stage, cls in _stage_trainer_classes().items():
        module = importlib.import_module(cls.__module__)
        assert module.create_custom_optimizer is trainer_utils.create_custom_optimizer, stage
        assert issubclass(cls, Trainer), stage
        for name in ("_clip_grad_norm", "_get_grad_norm", "_load_optimizer_and_scheduler", "save_model"):
            assert getattr(cls, name) is getattr(Trainer, name), (stage, name)


def test_ppo_with_mofasgd_is_refused_at_parse_time_naming_the_key_and_the_way_out(tmp_path, tiny_model):
    config = tiny_config(
        "tiny_sft_mfsgd.yaml",
        tiny_model,
        tmp_path / "out",
        stage="ppo",
        reward_model=str(tiny_model),
        reward_model_type="full",
    )
    with pytest.raises(ValueError, match=r"`use_mfsgd: true` cannot train `stage: ppo`.*trl 0\.8\.6-0\.9\.6") as error:
        get_train_args(config)
    assert "`stage: dpo` or `stage: kto`" in str(error.value)
    assert "trl 0.24.0 is installed" in str(error.value)


def test_run_py_names_a_stage_run_after_its_stage():
    import yaml

    from llamafactory_mfsgd.launcher import run_name

    def name(config: str) -> str:
        with open(CONFIGS / config) as f:
            return run_name(yaml.safe_load(f), ngpus=1)

    assert name("tiny_dpo_mfsgd.yaml").startswith("tiny-llama_tulu3_demo_pref_dpo-mfsgd-r8_bs8_")
    assert name("tiny_sft_mfsgd.yaml").startswith("tiny-llama_tulu3_demo_mfsgd-r8_bs8_")  # sft: as before


# ------------------------------------------------------------------------------------ end-to-end, per stage


@pytest.fixture(scope="module")
def stage_run(tiny_model, tmp_path_factory):
    """`stage_run(stage, projected=True)`: one 6-step llamafactory-cli run of the stage's tiny config (cached)."""
    work = tmp_path_factory.mktemp("stages")
    done = {}

    def run(stage: str, projected: bool = True):
        key = (stage, projected)
        if key not in done:
            name = f"{stage}_{'projected' if projected else 'hook'}"
            config = tiny_config(STAGE_CONFIGS[stage], tiny_model, work / name, mfsgd_projected_backward=projected)
            proc = run_cli(config, work)
            assert_ok(proc)
            done[key] = (config, work / name, proc.stdout)
        return done[key]

    return run


def _final_weights(out, stage: str) -> dict[str, torch.Tensor]:
    """The trained weights, the value head's included (LLaMA-Factory writes it apart for a reward model)."""
    found = weights(out)
    if stage == "rm":
        found.update(load_file(str(out / "value_head.safetensors")))
    return found


def _managed_names(start: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in start.items() if v.dim() == 2 and "embed" not in k and "lm_head" not in k]


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_stage_trains_every_matrix_with_mofasgd_on_the_projected_path_as_the_hook_path_does(
    stage, stage_run, tiny_model
):
    _, projected_out, stdout = stage_run(stage)
    _, hook_out, hook_stdout = stage_run(stage, projected=False)
    assert stdout.count("Using MoFaSGD") == 1
    assert f"Projected backward: {MATRICES} of {MATRICES} MoFaSGD matrices" in stdout
    assert f"Projected backward: 0 of {MATRICES}" in hook_stdout

    start = weights(tiny_model)
    projected, hooked = _final_weights(projected_out, stage), _final_weights(hook_out, stage)
    managed = _managed_names(start)
    assert len(managed) == MATRICES
    for key in managed:
        moved, expected = (projected[key] - start[key]).norm(), (hooked[key] - start[key]).norm()
        assert moved > 0.9 * expected > 0, key
    for key, value in hooked.items():
        if key == "v_head.summary.bias":  # the pairwise loss cancels it: AdamW moves it by its rounding noise alone
            continue
        torch.testing.assert_close(projected[key], value, atol=5e-5, rtol=5e-5, msg=key)

    logs, hook_logs = log_history(projected_out), log_history(hook_out)
    assert len(logs) == 6
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) and e["grad_norm"] > 0 for e in logs)
    assert [e["loss"] for e in logs] == pytest.approx([e["loss"] for e in hook_logs], rel=1e-4)
    assert [e["grad_norm"] for e in logs] == pytest.approx([e["grad_norm"] for e in hook_logs], rel=1e-4)
    assert all("mfsgd/update_rms_ratio" in e for e in logs)  # the Trainer.log patch reached this stage's trainer
    if stage in FIRST_LOSS:  # the reference is the untrained policy, and stays apart from it while it trains
        assert logs[0]["loss"] == pytest.approx(FIRST_LOSS[stage], abs=1e-4)
        assert abs(logs[-1]["rewards/margins"]) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_stage_checkpoint_holds_the_factors_of_exactly_the_managed_matrices(stage, stage_run):
    config, out, stdout = stage_run(stage)
    state = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)
    (mofasgd,) = [g for g in state["param_groups"] if g["mofasgd"]]
    assert len(mofasgd["params"]) == MATRICES
    assert all(".layers." in name for name in mofasgd["param_names"])
    for pid in mofasgd["params"]:
        s = state["state"][pid]
        assert s["U"].shape[1] == s["V"].shape[1] == s["S"].shape[0] == config["mfsgd_rank"]
        assert s["U"].dtype == s["S"].dtype == s["V"].dtype == torch.float32 and int(s["step"]) == 6
    side = {
        name: pid
        for g in state["param_groups"]
        if not g["mofasgd"]
        for name, pid in zip(g["param_names"], g["params"])
    }
    if stage == "rm":  # the value head (hidden -> 1) trains on the AdamW side, like the LM head
        head = side["v_head.summary.weight"]
        assert "exp_avg" in state["state"][head] and "U" not in state["state"][head]
        routing = stdout.split("Routing:")[1].split("Gradient paths:")[0]
        assert any(
            line.split()[:1] == ["v_head.summary.weight"] and line.split()[-1] == "AdamW"
            for line in routing.splitlines()
        )


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_stage_resumes_from_a_checkpoint_exactly(stage, stage_run, tmp_path):
    """TRL's DPO/KTO trainers resume through the patched Trainer: same weights and losses as the whole run."""
    config, out, _ = stage_run(stage)
    resumed = dict(config, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(out / "checkpoint-3"))
    assert_ok(run_cli(resumed, tmp_path))
    full, again = weights(out), weights(tmp_path / "resumed")
    for key in full:
        torch.testing.assert_close(again[key], full[key], atol=1e-6, rtol=1e-5, msg=key)
    tail = [e["loss"] for e in log_history(out)][3:]
    assert [e["loss"] for e in log_history(tmp_path / "resumed")][-3:] == pytest.approx(tail, rel=1e-5)


# ------------------------------------------------------------------------- DPO in this process: the reference


def test_dpo_reference_model_is_neither_managed_nor_attached_and_grad_norm_covers_the_matrices(
    tiny_model, tmp_path, monkeypatch
):
    """Full DPO loads a frozen copy of the model as reference: MoFaSGD manages and attaches the policy only, the
    reference keeps its weights, and the logged grad_norm is MoFaSGD's (the hidden matrices hold no .grad)."""
    import llamafactory.train.dpo.trainer as dpo_trainer
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    trainers, norms = [], []

    class RecordingDPOTrainer(dpo_trainer.CustomDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    class GradNorms(TrainerCallback):
        """After clipping, before the step: the whole norm, and the norm of the .grad tensors alone (AdamW side)."""

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            grads = [p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None]
            norms.append((float(unwrap_optimizer(optimizer).grad_norm()), float(sum(grads)) ** 0.5))

    monkeypatch.setattr(dpo_trainer, "CustomDPOTrainer", RecordingDPOTrainer)  # run_dpo imports it on each call
    config = tiny_config(
        STAGE_CONFIGS["dpo"], tiny_model, tmp_path / "out", max_steps=3, save_steps=3, max_grad_norm=100.0
    )
    run_exp(config, callbacks=[GradNorms()])

    (trainer,) = trainers
    policy, reference = trainer.model, trainer.ref_model
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert reference is not None and reference is not policy
    policy_ids = {id(p) for p in policy.parameters()}
    reference_ids = {id(p) for p in reference.parameters()}
    managed = [p for g in optimizer.param_groups for p in g["params"]]
    assert managed and all(id(p) in policy_ids for p in managed) and not reference_ids & policy_ids
    assert len(optimizer.attachment.projected()) == MATRICES
    attached = [m for m in policy.modules() if "_mofasgd_intake" in m.__dict__]
    assert len(attached) == MATRICES
    assert not [m for m in reference.modules() if "_mofasgd_intake" in m.__dict__]
    assert not any(p.requires_grad for p in reference.parameters())
    start = weights(tiny_model)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(p.detach(), start[name], rtol=0, atol=0, msg=name)
    trained = dict(policy.named_parameters())
    assert all((trained[k] - start[k]).norm() > 0 for k in _managed_names(start))

    logged = [e["grad_norm"] for e in log_history(tmp_path / "out")]
    assert len(norms) == len(logged) == 3
    for (whole, side), value in zip(norms, logged):
        assert value == pytest.approx(whole, rel=1e-3)  # no clipping at max_grad_norm 100
        assert whole**2 - side**2 > 0.05 * whole**2  # the matrices' tangent norms are in it (about 10 % here)
