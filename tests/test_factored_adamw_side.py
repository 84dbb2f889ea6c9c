"""adamw_state="factored" / "factored_no_momentum": the AdamW side with Adafactor's factored second moment.

Checked against a float64 reference written from the formulas, against torch's AdamW where the factored
estimate is exact (rank-1 squared gradients), for its memory, bf16 weights, and checkpoints.
"""

import pytest
import torch
from torch import nn

from mofasgd import MoFaSGD

BETAS, EPS, LR, WD = (0.9, 0.99), 1e-8, 1e-2, 0.1


def reference(weight, grads, momentum=True):
    """Float64 AdamW with v_ij = R_i C_j / mean(R), R/C the running means of g^2 over rows/columns."""
    w = weight.double().clone()
    m = torch.zeros_like(w)
    row, col = torch.zeros(w.shape[0], dtype=torch.float64), torch.zeros(w.shape[1], dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        sq = g * g + 1e-30
        row = BETAS[1] * row + (1 - BETAS[1]) * sq.mean(1)
        col = BETAS[1] * col + (1 - BETAS[1]) * sq.mean(0)
        v_hat = torch.outer(row, col) / row.mean() / (1 - BETAS[1] ** t)
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        direction, step = (m, LR / (1 - BETAS[0] ** t)) if momentum else (g, LR)
        w = w * (1 - LR * WD) - step * direction / (v_hat.sqrt() + EPS)
    return w


def run(weight, grads, state, cls=MoFaSGD):
    p = nn.Parameter(weight.clone())
    if cls is MoFaSGD:
        groups = [{"params": [p], "mofasgd": False, "adamw_state": state}]
        opt = MoFaSGD(groups, lr=LR, weight_decay=WD, adam_betas=BETAS, adam_eps=EPS)
    else:
        opt = torch.optim.AdamW([p], lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    for g in grads:
        p.grad = g.clone().to(p.dtype)
        opt.step()
        opt.zero_grad()
    return p.detach(), opt


def gradients(shape, steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("state,momentum", [("factored", True), ("factored_no_momentum", False)])
def test_factored_step_equals_the_float64_reference(state, momentum):
    weight, grads = torch.randn(12, 7, generator=torch.Generator().manual_seed(1)), gradients((12, 7))
    got, _ = run(weight, grads, state)
    want = reference(weight, grads, momentum)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)
    assert not torch.allclose(got, run(weight, grads, "full")[0], atol=1e-4)  # it is not plain AdamW


def test_factored_equals_torch_adamw_when_the_squared_gradients_have_rank_one():
    """v = E[g^2] of rank one (g_ij = a_i b_j s_t) is exactly what the factored estimate reproduces."""
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(9, generator=gen), torch.randn(6, generator=gen)
    grads = [torch.outer(a, b) * s for s in (1.0, -0.5, 2.0, 0.3)]
    weight = torch.randn(9, 6, generator=gen)
    got, _ = run(weight, grads, "factored")
    want, _ = run(weight, grads, None, cls=torch.optim.AdamW)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_factored_state_is_order_m_plus_n_and_vectors_keep_adamw():
    matrix, vector = nn.Parameter(torch.randn(300, 40)), nn.Parameter(torch.randn(40))
    sizes = {}
    for state in ("full", "factored", "factored_no_momentum"):
        opt = MoFaSGD([{"params": [matrix, vector], "mofasgd": False, "adamw_state": state}], lr=LR)
        matrix.grad, vector.grad = torch.randn(300, 40), torch.randn(40)
        opt.step()
        sizes[state] = {k: tuple(v.shape) for k, v in opt.state[matrix].items() if k != "step"}
        assert set(opt.state[vector]) == {"step", "exp_avg", "exp_avg_sq"}
        assert opt.state_bytes() > 0
    assert sizes["full"] == {"exp_avg": (300, 40), "exp_avg_sq": (300, 40)}
    assert sizes["factored"] == {"exp_avg": (300, 40), "exp_avg_sq_row": (300,), "exp_avg_sq_col": (40,)}
    assert sizes["factored_no_momentum"] == {"exp_avg_sq_row": (300,), "exp_avg_sq_col": (40,)}


def test_bf16_weights_move_with_fp32_factored_moments_that_survive_a_checkpoint():
    weight, grads = torch.randn(32, 16, generator=torch.Generator().manual_seed(3)), gradients((32, 16), 3)
    got, opt = run(weight.to(torch.bfloat16), grads, "factored")
    assert got.dtype == torch.bfloat16 and not torch.equal(got, weight.to(torch.bfloat16))
    want = reference(weight.to(torch.bfloat16).float(), grads)
    ulp = torch.exp2(torch.floor(torch.log2(want.abs())) - 7)  # bf16's spacing at each entry
    # stochastic rounding moves each step's result by less than one spacing: at most one per step, plus slack
    assert ((got.double() - want).abs() <= (len(grads) + 1) * ulp).all()
    state = opt.state_dict()
    fresh = MoFaSGD(
        [{"params": [nn.Parameter(got.clone())], "mofasgd": False, "adamw_state": "factored"}],
        lr=LR,
        weight_decay=WD,
        adam_betas=BETAS,
        adam_eps=EPS,
    )
    fresh.load_state_dict(state)
    (loaded,) = fresh.state.values()
    assert loaded["exp_avg_sq_row"].dtype == torch.float32 and loaded["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(loaded["exp_avg_sq_row"], opt.state[next(iter(opt.state))]["exp_avg_sq_row"])


def test_resuming_with_another_adamw_state_is_refused():
    p = nn.Parameter(torch.randn(4, 3))
    opt = MoFaSGD([{"params": [p], "mofasgd": False, "adamw_state": "factored"}], lr=LR)
    p.grad = torch.randn(4, 3)
    opt.step()
    other = MoFaSGD([{"params": [p], "mofasgd": False}], lr=LR)
    with pytest.raises(ValueError, match="AdamW-side state is 'factored'.*mfsgd_adamw_state: factored"):
        other.load_state_dict(opt.state_dict())


def test_unknown_adamw_state_is_refused():
    with pytest.raises(ValueError, match="Invalid adamw_state"):
        MoFaSGD([nn.Parameter(torch.randn(2, 2))], adamw_state="8bit")
