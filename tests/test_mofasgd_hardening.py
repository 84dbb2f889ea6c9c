"""Regression tests for the optimizer's silent-wrong and crash cases (issue 9): each one failed before its fix."""

import gc
import io
import logging

import pytest
import torch
from torch import nn

from mofasgd import MoFaSGD


def fresh(shape=(12, 7), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(*shape, generator=gen).to(dtype))


def backward_with(w, g):
    (w * g.to(w.dtype)).sum().backward()


# 1. a re-created optimizer must take the gradients a dead one used to swallow
def test_recreated_fused_optimizer_trains_after_the_old_one_is_deleted():
    w = fresh()
    opt1 = MoFaSGD([w], lr=0.1, rank=2)
    backward_with(w, torch.randn(12, 7))
    opt1.step()
    opt1.zero_grad()
    del opt1
    gc.collect()
    opt2 = MoFaSGD([w], lr=0.1, rank=2)
    before = w.detach().clone()
    backward_with(w, torch.randn(12, 7))
    opt2.step()
    assert (w - before).abs().max() > 1e-3


def test_newest_live_optimizer_owns_the_gradient_and_the_old_one_is_warned_about():
    w = fresh()
    opt1 = MoFaSGD([w], lr=0.1, rank=2)
    with pytest.warns(UserWarning, match="newest optimizer takes it over"):
        opt2 = MoFaSGD([w], lr=0.1, rank=2)
    backward_with(w, torch.randn(12, 7))
    assert "GV" in opt2.state[w] and "GV" not in opt1.state.get(w, {})


def test_remove_hooks_hands_the_gradient_back_and_a_takeover_is_not_undone_by_the_old_hooks():
    w = fresh()
    opt1 = MoFaSGD([w], lr=0.1, rank=2)
    with pytest.warns(UserWarning):
        opt2 = MoFaSGD([w], lr=0.1, rank=2)
    opt2.remove_hooks()  # nobody consumes it now: the deactivated hooks of opt1 stay off
    backward_with(w, torch.randn(12, 7))
    assert w.grad is not None and "GV" not in opt1.state.get(w, {}) and "GV" not in opt2.state[w]
    w.grad = None
    opt3 = MoFaSGD([w], lr=0.1, rank=2)  # no live owner left: no warning, and it takes the gradient
    backward_with(w, torch.randn(12, 7))
    assert w.grad is None and "GV" in opt3.state[w]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # torch's cycle warning
def test_backward_with_create_graph_keeps_the_projections_out_of_the_graph():
    w, twin = fresh(), fresh()
    opt, ref = MoFaSGD([w], lr=0.1, rank=2), MoFaSGD([twin], lr=0.1, rank=2)
    g = torch.randn(12, 7)
    (w * g).square().sum().backward(create_graph=True)  # the hook runs with grad mode on
    (twin * g).square().sum().backward()
    assert not opt.state[w]["GV"].requires_grad and not opt.state[w]["GtU"].requires_grad
    torch.testing.assert_close(opt.state[w]["GV"], ref.state[twin]["GV"])
    torch.testing.assert_close(opt.state[w]["GtU"], ref.state[twin]["GtU"])
    w.grad = None  # (the hook already freed it; this keeps the test free of the graph's reference cycle)


def test_dead_optimizer_hooks_are_removed_when_it_is_collected():
    w = fresh()
    opt = MoFaSGD([w], lr=0.1, rank=2)
    assert len(w._post_accumulate_grad_hooks) == 1
    del opt
    gc.collect()
    assert not w._post_accumulate_grad_hooks


# 2. a managed matrix whose gradient no hook consumed must still train
def test_matrix_unfrozen_after_construction_trains_like_the_non_fused_optimizer():
    w_fused, w_plain = fresh(), fresh()
    w_fused.requires_grad_(False)
    opt_fused = MoFaSGD([w_fused], lr=0.1, rank=2, fused=True)
    opt_plain = MoFaSGD([w_plain], lr=0.1, rank=2, fused=False)
    w_fused.requires_grad_(True)
    for step in range(3):
        g = torch.randn(12, 7, generator=torch.Generator().manual_seed(step))
        backward_with(w_fused, g)
        backward_with(w_plain, g)
        opt_fused.step()
        opt_plain.step()
        opt_fused.zero_grad()
        opt_plain.zero_grad()
    torch.testing.assert_close(w_fused, w_plain)
    assert len(w_fused._post_accumulate_grad_hooks) == 1  # hooked at the first step, used from then on


def test_gradient_set_by_hand_is_consumed_at_step_and_counts_in_grad_norm():
    w_fused, w_plain = fresh(), fresh()
    opt_fused = MoFaSGD([w_fused], lr=0.1, rank=2, fused=True)
    opt_plain = MoFaSGD([w_plain], lr=0.1, rank=2, fused=False)
    g = torch.randn(12, 7)
    w_fused.grad, w_plain.grad = g.clone(), g.clone()
    torch.testing.assert_close(opt_fused.grad_norm(), opt_plain.grad_norm())
    opt_fused.step()
    opt_plain.step()
    torch.testing.assert_close(w_fused, w_plain)
    assert w_fused.grad is None


# 3. resuming with other routing or rank is refused, saying what changed
def _trained_state(rank=3, shape=(12, 7), dtype=torch.float32):
    w = fresh(shape, dtype)
    opt = MoFaSGD([w], lr=0.1, rank=rank)
    backward_with(w, torch.randn(*shape))
    opt.step()
    return opt.state_dict()


def test_resume_with_a_different_rank_names_both_ranks():
    saved = _trained_state(rank=3)
    opt = MoFaSGD([fresh()], lr=0.1, rank=4)
    with pytest.raises(ValueError, match=r"rank 3 .*built with rank 4 .*mfsgd_rank: 3"):
        opt.load_state_dict(saved)


def test_resume_of_an_adamw_checkpoint_or_other_routing_says_what_changed():
    a = fresh()
    adamw = torch.optim.AdamW([a])
    backward_with(a, torch.randn(12, 7))
    adamw.step()
    with pytest.raises(ValueError, match="not saved by MoFaSGD"):
        MoFaSGD([fresh()]).load_state_dict(adamw.state_dict())
    saved = _trained_state(rank=3)
    other = MoFaSGD([{"params": [fresh()]}, {"params": [nn.Parameter(torch.zeros(3))], "mofasgd": False}], rank=3)
    with pytest.raises(
        ValueError, match=r"1 MoFaSGD matrices and 0 AdamW.*1 MoFaSGD matrices and 1 AdamW.*mfsgd_target"
    ):
        other.load_state_dict(saved)


def test_changed_hyperparameters_on_resume_are_logged(caplog):
    saved = _trained_state(rank=3)
    opt = MoFaSGD([fresh()], lr=0.1, rank=3, beta=0.5)
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        opt.load_state_dict(saved)
    assert "beta: 0.9 -> 0.5" in caplog.text  # checkpoint -> this optimizer's, which wins (issue 22, item 5)
    assert opt.param_groups[0]["beta"] == 0.5


# 6. corrupted-but-finite factors are refused with the parameter's name
@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda st: st["U"].fill_(3.0), "U is not orthonormal"),
        (lambda st: st.__setitem__("V", st["V"][:, :2].clone()), "V has shape"),
        (lambda st: st["S"].fill_(float("nan")), "S has non-finite"),
    ],
    ids=["not_orthonormal", "wrong_shape", "non_finite"],
)
def test_corrupted_factors_are_refused_naming_the_parameter(corrupt, message):
    saved = _trained_state(rank=3)
    corrupt(saved["state"][0])
    w = fresh()
    opt = MoFaSGD([{"params": [("layers.0.q_proj.weight", w)]}], lr=0.1, rank=3)
    with pytest.raises(ValueError, match=rf"`layers.0.q_proj.weight` of shape \(12, 7\): {message}"):
        opt.load_state_dict(saved)


# 8. bf16 parameters: factors come back fp32 and orthonormal, and training resumes bit-exactly
def _bf16_run(steps, stochastic_rounding, start=0, opt=None, w=None):
    if w is None:
        w = fresh((16, 10), torch.bfloat16)
        opt = MoFaSGD([w], lr=1e-2, rank=4, stochastic_rounding=stochastic_rounding)
    for step in range(start, start + steps):
        backward_with(w, torch.randn(16, 10, generator=torch.Generator().manual_seed(step)))
        opt.step()
        opt.zero_grad()
    return w, opt


@pytest.mark.parametrize("stochastic_rounding", [None, False], ids=["stochastic", "nearest"])
def test_bf16_resume_keeps_fp32_factors_and_is_bit_exact(stochastic_rounding):
    reference, _ = _bf16_run(6, stochastic_rounding)
    w, opt = _bf16_run(3, stochastic_rounding)
    buffer = io.BytesIO()
    torch.save({"w": w.detach(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    w2 = nn.Parameter(checkpoint["w"].clone())
    opt2 = MoFaSGD([w2], lr=1e-2, rank=4, stochastic_rounding=stochastic_rounding, seed=123)
    opt2.load_state_dict(checkpoint["optim"])
    state = opt2.state[w2]
    assert state["U"].dtype == state["S"].dtype == state["V"].dtype == torch.float32
    assert (state["U"].T @ state["U"] - torch.eye(4)).abs().max() < 1e-5
    _bf16_run(3, stochastic_rounding, start=3, opt=opt2, w=w2)
    assert torch.equal(w2, reference)


# 9. non-finite gradients skip the step (the whole step since issue 22, item 7) and keep the factors finite
def test_non_finite_gradient_skips_the_step_and_warns(caplog):
    good, bad = fresh(seed=1), fresh(seed=2)
    opt = MoFaSGD([good, bad], lr=0.1, rank=2)
    backward_with(good, torch.randn(12, 7))
    backward_with(bad, torch.randn(12, 7))
    opt.step()
    opt.zero_grad()
    good_before, bad_before = good.detach().clone(), bad.detach().clone()
    factors_before = {k: opt.state[bad][k].clone() for k in ("U", "S", "V")}
    g = torch.randn(12, 7)
    g[3, 4] = float("inf")
    backward_with(good, torch.randn(12, 7))
    backward_with(bad, g)
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        opt.step()
    assert "non-finite gradient in 1 tensor (" in caplog.text
    assert torch.equal(bad, bad_before) and torch.equal(good, good_before)
    for key, value in factors_before.items():
        assert torch.equal(opt.state[bad][key], value), key
    assert "GV" not in opt.state[bad]
    assert int(opt.state[bad]["step"]) == int(opt.state[good]["step"]) == 1  # a skipped step counts for nothing
    opt.zero_grad()
    backward_with(bad, torch.randn(12, 7))
    opt.step()
    assert torch.isfinite(bad).all() and not torch.equal(bad, bad_before)


def test_non_finite_gradient_in_non_fused_mode_does_not_crash():
    w = fresh()
    opt = MoFaSGD([w], lr=0.1, rank=2, fused=False)
    backward_with(w, torch.full((12, 7), float("nan")))
    before = w.detach().clone()
    opt.step()
    assert torch.equal(w, before)


# grad_norm: summed on the device, no host round trip per parameter
def test_grad_norm_makes_no_host_copies(monkeypatch):
    params = [fresh(seed=i) for i in range(4)] + [nn.Parameter(torch.randn(5))]
    opt = MoFaSGD([{"params": params[:4]}, {"params": params[4:], "mofasgd": False}], rank=2)
    for p in params:
        (p * torch.randn_like(p)).sum().backward()
    calls = []
    for name in ("cpu", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(self, *a, **k)
        )
    norm = opt.grad_norm()
    monkeypatch.undo()
    assert calls == []
    assert norm.dtype == torch.float64 and norm > 0
