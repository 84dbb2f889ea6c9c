"""enable_mofasgd on transformers.Trainer and TRL's SFTTrainer: routing, grad norm, clipping, resume, refusals."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from dense_reference import DenseMoFaSGD
from hf_trainers import KINDS, make_trainer

from llamafactory_mfsgd.launcher import free_port
from mofasgd import MoFaSGD
from mofasgd.integrations.transformers import enable_mofasgd

RANK = 4
TESTS = Path(__file__).resolve().parent


def _unwrapped(trainer) -> MoFaSGD:
    optimizer = trainer.optimizer
    while not isinstance(optimizer, MoFaSGD):
        optimizer = optimizer.optimizer
    return optimizer


def _hidden_matrix_names(model) -> set[str]:
    """The 2-D weights that are neither the input embeddings nor the LM head: what MoFaSGD must manage."""
    excluded = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return {n for n, p in model.named_parameters() if p.dim() == 2 and id(p) not in excluded}


def _capture_first_batch(trainer) -> dict:
    """Record the inputs and num_items_in_batch of the trainer's first compute_loss (this instance only)."""
    seen: dict = {}
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        if not seen:
            seen["inputs"] = {k: v.clone() for k, v in inputs.items()}
            seen["num_items_in_batch"] = kwargs.get("num_items_in_batch")
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return seen


def _reference_first_step(trainer_kind, model_dir, tmp_path, batch, lr, max_grad_norm):
    """Independently of MoFaSGD's code: the dense gradient of the first batch, the norm the optimizer must see (the
    tangent projection of each hidden matrix from the top-r SVD of its weight, whole gradients elsewhere), the
    AdamW side's share of it, and the hidden matrices after the (clipped) first step of the dense reference."""
    model = make_trainer(trainer_kind, model_dir, tmp_path / "reference").model
    model.train()
    loss = model(**batch["inputs"], num_items_in_batch=batch["num_items_in_batch"]).loss
    loss.backward()
    hidden = _hidden_matrix_names(model)
    managed_sq, side_sq, dense = 0.0, 0.0, {}
    for name, p in model.named_parameters():
        grad = p.grad.double()
        if name in hidden:
            dense[name] = DenseMoFaSGD(p.detach(), rank=RANK, lr=lr)
            managed_sq += dense[name].tangent(grad).square().sum().item()
        else:
            side_sq += grad.square().sum().item()
    norm = math.sqrt(managed_sq + side_sq)
    coef = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm > 0 else 1.0
    params = dict(model.named_parameters())
    unclipped = {}
    for name, reference in dense.items():
        unclipped[name] = DenseMoFaSGD(params[name].detach(), rank=RANK, lr=lr)
        unclipped[name].step(params[name].grad)
        reference.step(coef * params[name].grad.double())
    return SimpleNamespace(
        loss=loss.item(),
        norm=norm,
        side_norm=math.sqrt(side_sq),
        clipped={n: r.W for n, r in dense.items()},
        unclipped={n: r.W for n, r in unclipped.items()},
    )


@pytest.mark.parametrize("kind", KINDS)
def test_enable_mofasgd_trains_every_hidden_matrix_with_mofasgd_and_schedules_both_groups(kind, tiny_model, tmp_path):
    trainer = enable_mofasgd(make_trainer(kind, tiny_model, tmp_path), rank=RANK, lr=1e-2, adamw_lr=1e-3)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()

    optimizer = _unwrapped(trainer)
    names = {id(p): n for n, p in model.named_parameters()}
    managed = {names[id(p)] for g in optimizer.param_groups if g["mofasgd"] for p in g["params"]}
    assert managed == _hidden_matrix_names(model)
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not move"
    for g in optimizer.param_groups:
        for p in g["params"]:
            if g["mofasgd"]:
                assert {"U", "S", "V"} <= set(optimizer.state[p]), names[id(p)]
    # the linear schedule drove every group: 4 steps of 4 leave each at 0, from its own base rate
    bases = sorted({g["initial_lr"] for g in optimizer.param_groups})
    assert bases == [1e-3, 1e-2]
    assert all(g["lr"] == 0.0 for g in optimizer.param_groups)
    assert optimizer.attachment.projected(), "no matrix took the projected backward"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_grad_norm", [0.0, 1e6], ids=["norm_only", "clip_path"])
def test_logged_grad_norm_covers_the_hidden_matrices(kind, max_grad_norm, tiny_model, tmp_path):
    trainer = make_trainer(kind, tiny_model, tmp_path / "run", max_steps=1, max_grad_norm=max_grad_norm)
    enable_mofasgd(trainer, rank=RANK)
    batch = _capture_first_batch(trainer)
    trainer.train()
    logged = trainer.state.log_history[0]

    reference = _reference_first_step(kind, tiny_model, tmp_path, batch, 1e-2, max_grad_norm)
    assert logged["loss"] == pytest.approx(reference.loss, rel=1e-5)  # the reference computed the same loss
    # rel 1e-3: TRL's padded batches give a dense gradient 2e-4 off the Trainer's own, with torch's AdamW as well
    assert logged["grad_norm"] == pytest.approx(reference.norm, rel=1e-3)
    # what transformers' own clip_grad_norm_(model.parameters()) reads: the AdamW side alone, far outside the tolerance
    assert logged["grad_norm"] - reference.side_norm > 0.02 * reference.norm


@pytest.mark.parametrize("kind", KINDS)
def test_max_grad_norm_scales_the_hidden_matrices_step(kind, tiny_model, tmp_path):
    max_grad_norm = 0.3
    trainer = make_trainer(kind, tiny_model, tmp_path / "run", max_steps=1, max_grad_norm=max_grad_norm)
    enable_mofasgd(trainer, rank=RANK)
    batch = _capture_first_batch(trainer)
    trainer.train()

    reference = _reference_first_step(kind, tiny_model, tmp_path, batch, 1e-2, max_grad_norm)
    assert reference.norm > 2 * max_grad_norm  # so that clipping really scales this step
    params = dict(trainer.model.named_parameters())
    for name, expected in reference.clipped.items():
        got = params[name].detach().double()
        error = (got - expected).abs().max().item()
        assert error < 1e-5, name
        assert (got - reference.unclipped[name]).abs().max().item() > 100 * max(error, 1e-7), name


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_a_trainer_checkpoint_ends_on_the_uninterrupted_run_weights(kind, tiny_model, tmp_path):
    arguments = dict(max_steps=6, save_strategy="steps", save_steps=3, max_grad_norm=1.0)
    full = enable_mofasgd(make_trainer(kind, tiny_model, tmp_path / "full", **arguments), rank=RANK)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    factors = [s for s in saved["state"].values() if "U" in s]
    assert len(factors) == len(_hidden_matrix_names(full.model))
    assert all({"U", "S", "V"} <= set(s) for s in factors)

    resumed = enable_mofasgd(make_trainer(kind, tiny_model, tmp_path / "resumed", **arguments), rank=RANK)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    expected = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=0, msg=name)
    lrs = [g["lr"] for g in _unwrapped(resumed).param_groups]
    assert lrs == [g["lr"] for g in _unwrapped(full).param_groups]


def test_unknown_and_misplaced_options_are_refused_naming_the_valid_ones(tiny_model, tmp_path):
    trainer = make_trainer("trainer", tiny_model, tmp_path)
    with pytest.raises(
        ValueError, match=r"Unknown MoFaSGD option `rnak`. Did you mean `rank`\?.*Valid options:.*beta"
    ):
        enable_mofasgd(trainer, rnak=8)
    with pytest.raises(ValueError, match=r"`weight_decay`.*TrainingArguments.weight_decay"):
        enable_mofasgd(trainer, weight_decay=0.1)
    with pytest.raises(ValueError, match="`data_parallel` is not an option"):
        enable_mofasgd(trainer, data_parallel=True)
    with pytest.raises(ValueError, match="Invalid beta"):
        enable_mofasgd(trainer, beta=1.5)
    with pytest.raises(ValueError, match="eta2"):
        enable_mofasgd(trainer, eta2=0.5)  # needs fused=False: MoFaSGD's own refusal, before training
    assert trainer.optimizer_cls_and_kwargs is None  # nothing was changed by the refused calls


def test_a_trainer_given_its_own_optimizer_is_refused(tiny_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_trainer("trainer", tiny_model, tmp_path).model
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizers="):
        enable_mofasgd(Trainer(model=model, args=args, optimizers=(adamw, None)))
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        enable_mofasgd(trainer)


def test_a_subclass_that_ignores_the_factory_fails_at_train_start(tiny_model, tmp_path):
    from transformers import Trainer

    class OwnOptimizer(Trainer):
        def create_optimizer(self, model=None):
            self.optimizer = self.optimizer or torch.optim.AdamW(self.model.parameters())
            return self.optimizer

    base = make_trainer("trainer", tiny_model, tmp_path)
    trainer = OwnOptimizer(model=base.model, args=base.args, train_dataset=base.train_dataset)
    enable_mofasgd(trainer)
    with pytest.raises(RuntimeError, match="trains with AdamW.*did not use `optimizer_cls_and_kwargs`"):
        trainer.train()


@pytest.mark.slow
def test_deepspeed_is_refused(tiny_model, tmp_path):
    pytest.importorskip("deepspeed")
    # in a process of its own: a DeepSpeed Trainer leaves its plugin in accelerate's process-wide state
    code = (
        "import sys\nfrom hf_trainers import make_trainer\n"
        "from mofasgd.integrations.transformers import enable_mofasgd\n"
        "ds = {'zero_optimization': {'stage': 2}, 'train_micro_batch_size_per_gpu': 'auto'}\n"
        "enable_mofasgd(make_trainer('trainer', sys.argv[1], sys.argv[2], deepspeed=ds))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode != 0
    assert (
        "ValueError: MoFaSGD does not run under DeepSpeed: ZeRO hands the optimizer flattened 1-D shards"
        in proc.stderr
    )


def test_fsdp1_is_refused(tiny_model, tmp_path, monkeypatch):
    # FSDP1 cannot be built on a CPU (accelerate wants a device, transformers several processes): the accelerator
    # state it leaves, set on this trainer's accelerator by hand
    trainer = make_trainer("trainer", tiny_model, tmp_path)
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=1), raising=False)
    with pytest.raises(ValueError, match="does not run under FSDP1.*fsdp_version': 2"):
        enable_mofasgd(trainer)


def test_an_fsdp2_checkpoint_with_a_whole_optimizer_file_is_refused_on_resume(tiny_model, tmp_path, monkeypatch):
    # FULL_STATE_DICT saves optimizer.bin, which enable_mofasgd does not read into MoFaSGD's shards: FSDP2's
    # accelerator state set by hand, as for FSDP1 above
    trainer = make_trainer("trainer", tiny_model, tmp_path)
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=2), raising=False)
    enable_mofasgd(trainer)
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "optimizer.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="optimizer.bin.*FULL_STATE_DICT.*SHARDED_STATE_DICT"):
        trainer._load_optimizer_and_scheduler(str(checkpoint))


def test_fp16_with_fused_mofasgd_is_refused(tiny_model, tmp_path):
    trainer = make_trainer("trainer", tiny_model, tmp_path, fp16=True)
    with pytest.raises(ValueError, match="fp16=True.*fused=False"):
        enable_mofasgd(trainer)


def test_the_mofasgd_package_imports_no_transformers():
    code = "import sys, mofasgd, mofasgd.build, mofasgd.resume; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_two_ddp_processes_train_like_one(kind, tiny_model, tmp_path):
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
        command += ["--master_port", str(free_port()), str(TESTS / "hf_ddp_worker.py"), kind, str(tiny_model)]
        command += [str(out), str(out / "result.pt")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-6000:]
        results[world] = torch.load(out / "result.pt", weights_only=True)
    assert results[1]["data_parallel"] and results[2]["data_parallel"]  # DDP wraps one torchrun process too
    model = make_trainer(kind, tiny_model, tmp_path / "base").model
    base, hidden = model.state_dict(), _hidden_matrix_names(model)
    for name, weight in results[1]["weights"].items():
        assert not torch.equal(weight, base[name]), f"{name} did not move"
        if name in hidden:  # MoFaSGD's matrices: the averaged projections give one process's step, to rounding
            torch.testing.assert_close(results[2]["weights"][name], weight, rtol=0, atol=2e-5)
    # Not compared: the AdamW side. Its first steps are about sign(g), so gradients near zero flip with the
    # all-reduce's rounding (measured: 7 of the LM head's 57,920 entries for the Trainer, 172 for SFT, by up to
    # one step; torch's AdamW alone differs the same way between 1 and 2 processes here).


def _run_fsdp2_worker(kind, tiny_model, out, resume_from=None):
    """A 2-process FSDP2 run of tests/hf_fsdp2_worker.py (6 steps, checkpoints at 3 and 6); its result file."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), str(TESTS / "hf_fsdp2_worker.py"), kind, str(tiny_model), str(out)]
    command += [str(out / "result.pt")] + ([str(resume_from)] if resume_from else [])
    env = {**os.environ, "MFSGD_CPU_FSDP2": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(out / "result.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_two_processes_train_like_one_and_resume_exactly(kind, tiny_model, tmp_path):
    """transformers' own FSDP2 path (accelerate's fully_shard, sharded DCP checkpoints) on 2 CPU processes: the
    MoFaSGD matrices end as in one process, the checkpoint holds every matrix's factors, and a run resumed from
    checkpoint-3 ends on the uninterrupted run's weights."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    sharded = _run_fsdp2_worker(kind, tiny_model, tmp_path / "fsdp2")
    assert sharded["sharded"] and all(sharded["sharded"])  # the optimizer stepped FSDP2's DTensor shards
    assert not sharded["data_parallel"]

    arguments = dict(max_steps=6, max_grad_norm=1.0, bf16=False)  # as the worker: TRL's SFTConfig defaults to bf16
    single = enable_mofasgd(make_trainer(kind, tiny_model, tmp_path / "single", **arguments), rank=RANK)
    single.train()
    model = make_trainer(kind, tiny_model, tmp_path / "base").model
    base, hidden = model.state_dict(), _hidden_matrix_names(model)
    expected = dict(single.model.named_parameters())
    assert max(e["grad_norm"] for e in sharded["log"] if "grad_norm" in e) > 1.0  # clipping was active
    for name in hidden:
        weight = sharded["weights"][name]
        assert not torch.equal(weight, base[name]), f"{name} did not move"
        torch.testing.assert_close(weight, expected[name].detach(), atol=2e-5, rtol=1e-4, msg=name)

    checkpoint = tmp_path / "fsdp2" / "checkpoint-3"
    merged = tmp_path / "optimizer-3.pt"
    dcp_to_torch_save(str(checkpoint / "optimizer_0"), str(merged))
    state = torch.load(merged, weights_only=True)["optimizer"]["state"]
    assert {n for n, s in state.items() if {"U", "S", "V"} <= set(s)} == hidden

    resumed = _run_fsdp2_worker(kind, tiny_model, tmp_path / "resumed", resume_from=checkpoint)
    for name, weight in resumed["weights"].items():  # bit for bit, as without FSDP
        torch.testing.assert_close(weight, sharded["weights"][name], atol=0, rtol=0, msg=name)

    def logged(result):  # loss and grad norm of steps 1-6 (the resumed run's steps 1-3 come from trainer_state)
        return [value for e in result["log"] if "loss" in e for value in (e["loss"], e["grad_norm"])]

    assert len(logged(resumed)) == 12
    assert logged(resumed) == pytest.approx(logged(sharded), rel=1e-6)
