"""Regression tests for the optimizer's silent-wrong cases of issue 22 (Hardening 3): each failed before its fix."""

import copy
import io
import logging

import pytest
import torch
from torch import nn

from mofasgd import MoFaSGD


def fresh(shape=(12, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(*shape, generator=gen))


def _params(seed=0):
    return [fresh(seed=seed), fresh((7,), seed=seed + 1)]


def _optimizer(params, **options):
    groups = [{"params": params[:1]}, {"params": params[1:], "mofasgd": False, "weight_decay": options.pop("wd", 0.0)}]
    return MoFaSGD(groups, **{"lr": 0.02, "rank": 3, **options})


def _steps(params, opt, steps, start=0, scheduler=None):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(step)
        sum((p * torch.randn(p.shape, generator=gen)).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def _checkpoint(options=None, scheduled=False):
    params = _params()
    opt = _optimizer(params, **(options or {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step) if scheduled else None
    _steps(params, opt, 2, scheduler=scheduler)
    buffer = io.BytesIO()
    torch.save({"weights": [p.detach() for p in params], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _restored(checkpoint):
    return [nn.Parameter(w.clone()) for w in checkpoint["weights"]]


# item 5: a resumed run uses the hyper-parameters it was started with, and says which ones changed
_EDITS = {"lr": 0.05, "beta": 0.5, "nesterov": True, "use_ones_for_nonzero_s": True, "weight_decay": 0.1}


def test_resume_applies_edited_hyperparameters_and_logs_old_to_new(caplog):
    checkpoint = _checkpoint({"wd": 0.01})
    edited = _restored(checkpoint)
    opt = _optimizer(edited, wd=0.2, **_EDITS)
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        opt.load_state_dict(copy.deepcopy(checkpoint["optim"]))
    for key, value in _EDITS.items():
        assert opt.param_groups[0][key] == value, key
    assert opt.param_groups[1]["weight_decay"] == 0.2
    for text in (
        "beta: 0.9 -> 0.5",
        "nesterov: False -> True",
        "use_ones_for_nonzero_s: False -> True",
        "weight_decay (MoFaSGD matrices): 0 -> 0.1",
        "weight_decay (AdamW side): 0.01 -> 0.2",
        "lr (MoFaSGD matrices): 0.02 -> 0.05",
    ):
        assert text in caplog.text, text
    _steps(edited, opt, 2, start=2)

    # the same as loading torch-style and then editing the groups by hand; not what the unedited run gives
    reference, unedited = _restored(checkpoint), _restored(checkpoint)
    ref_opt, unedited_opt = _optimizer(reference, wd=0.01), _optimizer(unedited, wd=0.01)
    ref_opt.load_state_dict(copy.deepcopy(checkpoint["optim"]))  # torch's load shares the state's tensors
    unedited_opt.load_state_dict(copy.deepcopy(checkpoint["optim"]))
    for group, weight_decay in zip(ref_opt.param_groups, (0.1, 0.2)):
        group.update(_EDITS, weight_decay=weight_decay)
    _steps(reference, ref_opt, 2, start=2)
    _steps(unedited, unedited_opt, 2, start=2)
    for a, b, c in zip(edited, reference, unedited):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_resume_without_edits_keeps_the_checkpoint_values_and_says_nothing(caplog):
    checkpoint = _checkpoint({"beta": 0.7}, scheduled=True)
    params = _restored(checkpoint)
    opt = _optimizer(params, beta=0.7)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        opt.load_state_dict(checkpoint["optim"])
    assert "resumes with" not in caplog.text
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in checkpoint["optim"]["param_groups"]]


def test_resume_under_a_scheduler_takes_the_new_base_lr_at_the_saved_schedule_position(caplog):
    checkpoint = _checkpoint(scheduled=True)  # lr 0.02, two steps of the 0.5**step schedule: lr 0.005
    params = _restored(checkpoint)
    opt = _optimizer(params, lr=0.04)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)  # HF builds the scheduler before loading
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        opt.load_state_dict(checkpoint["optim"])
    group = opt.param_groups[0]
    assert group["initial_lr"] == 0.04
    assert group["lr"] == pytest.approx(0.01)
    assert "lr (base, initial_lr) (MoFaSGD matrices): 0.02 -> 0.04" in caplog.text


def test_resume_still_refuses_a_rank_change():
    checkpoint = _checkpoint()
    with pytest.raises(ValueError, match="mfsgd_rank: 3"):
        _optimizer(_restored(checkpoint), rank=4).load_state_dict(checkpoint["optim"])


# item 7: a non-finite gradient anywhere skips the whole step, both sides, and says which tensors
def _named_optimizer(fused=True, **options):
    matrices = [fresh(seed=1), fresh(seed=2)]
    vector, embedding = fresh((7,), seed=3), fresh((5, 7), seed=4)
    groups = [
        {"params": [("layers.0.q_proj.weight", matrices[0]), ("layers.0.k_proj.weight", matrices[1])]},
        {"params": [("norm.weight", vector), ("embed_tokens.weight", embedding)], "mofasgd": False, "lr": 0.01},
    ]
    return [*matrices, vector, embedding], MoFaSGD(groups, lr=0.02, rank=2, fused=fused, weight_decay=0.1, **options)


def _backward(params, seed, poison=None):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    if poison is not None:
        grads[poison].view(-1)[3] = float("nan")
    sum((p * g).sum() for p, g in zip(params, grads)).backward()


def _snapshot(params, opt):
    state = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params]
    return [p.detach().clone() for p in params], state


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("poison", [0, 2, 3], ids=["managed", "norm", "embedding"])
@pytest.mark.parametrize("clip", [False, True], ids=["step", "clip_then_step"])
def test_non_finite_gradient_anywhere_skips_the_whole_step(caplog, fused, poison, clip):
    params, opt = _named_optimizer(fused)
    _backward(params, 0)
    opt.step()
    opt.zero_grad()
    weights, states = _snapshot(params, opt)
    _backward(params, 1, poison=poison)
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        if clip:
            opt.clip_grad_norm_(1.0)
        opt.step()
    name = ("layers.0.q_proj.weight", None, "norm.weight", "embed_tokens.weight")[poison]
    assert "skipped this optimizer step" in caplog.text and f"`{name}`" in caplog.text
    assert "non-finite gradient in 1 tensor (" in caplog.text
    for p, before, state in zip(params, weights, states):
        assert torch.equal(p, before)
        for key, value in state.items():
            assert torch.equal(opt.state[p][key], value), key  # factors, AdamW moments, step counters
    opt.zero_grad()
    _backward(params, 2)  # the next finite step trains every tensor again
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, before) for p, before in zip(params, weights))


def test_a_skipped_step_keeps_the_last_clip_coefficient_for_the_fused_adamw_side():
    params, opt = _named_optimizer(fused_adamw_side=True)
    coefficients = []
    for step, poison in enumerate((None, 0)):
        _backward(params, step, poison=poison)  # the embedding is updated in its hook, with the last coefficient
        opt.clip_grad_norm_(1e-3)
        opt.step()
        opt.zero_grad()
        coefficients.append(opt._side_clip_coef)
    assert 0 < coefficients[0] < 1.0
    assert coefficients[1] == coefficients[0]  # not the NaN norm's coefficient, which would leave it unclipped


@pytest.mark.parametrize("init", ["weight", "weight_randomized"])
def test_non_finite_initial_weight_is_refused_naming_the_parameter(init):
    params, opt = _named_optimizer(init=init)
    with torch.no_grad():
        params[1][2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`layers.0.k_proj.weight` of shape \(12, 7\) holds non-finite values"):
        _backward(params, 0)  # fused: the factors are initialised in the gradient hook
        opt.step()


# item 8: a vanishing gradient inflates the 1/S step; diagnostics warn once, and an opt-in guard bounds it
def _zero_gradient_run(steps=80, diagnostics=False, **options):
    torch.manual_seed(0)
    w = nn.Parameter(0.02 * torch.randn(64, 64))
    opt = MoFaSGD([w], lr=1e-2, **options)
    for _ in range(steps):
        w.grad = torch.zeros_like(w)
        if diagnostics:
            opt.request_diagnostics()
        opt.step()
        opt.zero_grad()
        if diagnostics:
            opt.pop_diagnostics()
    return float(w.detach().norm())


def _normal_run(steps=30, diagnostics=False, **options):
    torch.manual_seed(0)
    w, target = nn.Parameter(0.02 * torch.randn(16, 12)), torch.randn(16, 12)
    opt = MoFaSGD([w], lr=1e-2, rank=3, **options)
    logs = []
    for _ in range(steps):
        (w - target).square().sum().backward()
        if diagnostics:
            opt.request_diagnostics()
        opt.step()
        opt.zero_grad()
        if diagnostics:
            logs.append(opt.pop_diagnostics())
    return w.detach(), logs


def test_zero_gradient_inflates_the_1_over_s_step_unless_the_guard_is_on():
    assert _zero_gradient_run() > 500 * 1.3  # the authors' step (the default): 1.27 -> 1357
    torch.manual_seed(0)
    start = float((0.02 * torch.randn(64, 64)).norm())
    assert _zero_gradient_run(min_gradient_support=0.01) == pytest.approx(start, rel=1e-6)


def test_the_guard_leaves_a_normal_run_unchanged():
    plain, _ = _normal_run()
    guarded, _ = _normal_run(min_gradient_support=0.01)
    assert torch.equal(plain, guarded)


def test_diagnostics_warn_once_when_the_gradient_vanishes(caplog):
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        _zero_gradient_run(diagnostics=True)
    assert caplog.text.count("has all but vanished") == 1
    assert "mfsgd_min_gradient_support" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        _, logs = _normal_run(diagnostics=True)
        _zero_gradient_run(diagnostics=True, min_gradient_support=0.01)  # guarded: nothing to warn about
    assert "vanished" not in caplog.text
    assert min(log["gradient_support"] for log in logs) > 0.01


def test_a_matrix_that_takes_no_step_is_not_reported_as_vanishing(caplog):
    w = fresh((16, 12))
    opt = MoFaSGD([w], lr=1e-2, rank=3, init="gradient")  # S = 0 until a gradient arrives: no step, no growth
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        for _ in range(3):
            w.grad = torch.zeros_like(w)
            opt.request_diagnostics()
            opt.step()
            opt.zero_grad()
            opt.pop_diagnostics()
    assert "vanished" not in caplog.text


def test_a_non_finite_gradient_updated_in_its_hook_is_not_applied_and_skips_the_step(caplog):
    params, opt = _named_optimizer(fused_adamw_side=True)  # the embedding (a matrix) is updated in its hook
    _backward(params, 0)
    opt.step()
    opt.zero_grad()
    weights, states = _snapshot(params, opt)
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        _backward(params, 1, poison=3)
        opt.step()
    assert "non-finite gradient in 1 tensor (`embed_tokens.weight`" in caplog.text
    for p, before, state in zip(params, weights, states):
        assert torch.equal(p, before)
        for key, value in state.items():
            assert torch.equal(opt.state[p][key], value), key
    opt.zero_grad()
    _backward(params, 2)
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, before) for p, before in zip(params, weights))
