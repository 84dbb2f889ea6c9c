"""MoFaSGD equals a dense float64 implementation of docs/algorithm.md §2, fused and non-fused, for every option."""

import pytest
import torch
from dense_reference import DenseMoFaSGD

from mofasgd import MoFaSGD

pytestmark = pytest.mark.usefixtures("both_panel_qr_forms")  # CPU and CUDA panel QR forms

SHAPES = [(12, 7), (6, 15), (9, 9), (4, 10)]  # tall, wide, square, and rank >= min(m, n) with rank 5


def make_pair(shape, rank, fused, seed=0, **options):
    torch.manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    options = {"lr": 0.05, "rank": rank, "fused": fused, **options}
    return weight, MoFaSGD([weight], **options), DenseMoFaSGD(weight, **options)


def backward_with_grad(weight, grad):
    """Make `grad` the gradient of weight through a real backward pass (so fused hooks fire)."""
    (weight * grad).sum().backward()


def run_trajectory(weight, opt, ref, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grad = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
        backward_with_grad(weight, grad)
        opt.step()
        opt.zero_grad()
        ref.step(grad)


def assert_matches(weight, opt, ref, tol=1e-9):
    state = opt.state[weight]
    momentum = state["U"] @ torch.diag(state["S"]) @ state["V"].T
    torch.testing.assert_close(momentum, ref.momentum, atol=tol, rtol=tol)
    torch.testing.assert_close(weight.detach(), ref.W, atol=tol, rtol=tol)


OPTIONS = {
    "reciprocal_s": {},
    "spectral_ones": {"use_ones_for_nonzero_s": True},
    "nesterov": {"nesterov": True},
    "weight_decay": {"weight_decay": 0.1},
    "nesterov_ones_wd": {"nesterov": True, "use_ones_for_nonzero_s": True, "weight_decay": 0.05, "beta": 0.5},
    "clamped_max_value": {"max_value": 0.3},
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "nonfused"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(OPTIONS))
def test_one_step_and_20_step_trajectory_match_dense_reference(name, shape, fused):
    rank = 5 if shape == (4, 10) else 3
    weight, opt, ref = make_pair(shape, rank, fused, **OPTIONS[name])
    run_trajectory(weight, opt, ref, steps=1)
    assert_matches(weight, opt, ref)
    run_trajectory(weight, opt, ref, steps=19, seed=2)
    assert_matches(weight, opt, ref, tol=1e-8)


@pytest.mark.parametrize("use_current_projection", [False, True], ids=["previous_basis", "current_basis"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_eta2_complement_term_matches_dense_reference(shape, use_current_projection):
    weight, opt, ref = make_pair(
        shape, 3, fused=False, eta2=0.7, use_current_projection=use_current_projection, nesterov=True
    )
    run_trajectory(weight, opt, ref, steps=20)
    assert_matches(weight, opt, ref, tol=1e-8)


def test_beta_warmup_follows_linear_schedule():
    weight, opt, ref = make_pair((10, 8), 3, fused=True)
    for group in opt.param_groups:
        group.update(beta_start=0.5, beta_end=0.9, beta_warmup_steps=4)
    gen = torch.Generator().manual_seed(3)
    for t in range(7):
        grad = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
        backward_with_grad(weight, grad)
        opt.step()
        ref.step(grad, beta=0.5 + 0.4 * min(t / 4, 1.0))
    assert_matches(weight, opt, ref, tol=1e-8)


def test_full_rank_momentum_is_plain_heavy_ball():
    """With rank >= min(m, n) the tangent projection is the identity: M_t = beta M_{t-1} + G_t exactly."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 9, dtype=torch.float64))
    opt = MoFaSGD([weight], lr=0.0, rank=8, beta=0.8)
    state_m = None
    for _ in range(5):
        grad = torch.randn(4, 9, dtype=torch.float64)
        backward_with_grad(weight, grad)
        if state_m is None:
            s = opt.state[weight]
            state_m = s["U"] @ torch.diag(s["S"]) @ s["V"].T
        opt.step()
        state_m = 0.8 * state_m + grad
    s = opt.state[weight]
    torch.testing.assert_close(s["U"] @ torch.diag(s["S"]) @ s["V"].T, state_m)


def test_fused_and_nonfused_give_identical_trajectories():
    torch.manual_seed(0)
    init = torch.randn(20, 13, dtype=torch.float64)
    results = []
    for mode in (True, False):
        weight = torch.nn.Parameter(init.clone())
        opt = MoFaSGD([weight], lr=0.03, rank=4, nesterov=True, fused=mode)
        gen = torch.Generator().manual_seed(5)
        for _ in range(10):
            backward_with_grad(weight, torch.randn(20, 13, generator=gen, dtype=torch.float64))
            opt.step()
            opt.zero_grad()
        results.append(weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=1e-12, rtol=1e-12)


def test_gradient_init_of_low_rank_gradient_gives_its_exact_svd():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(30, 20, dtype=torch.float64))
    grad = torch.randn(30, 2, dtype=torch.float64) @ torch.randn(2, 20, dtype=torch.float64)
    opt = MoFaSGD([weight], lr=0.0, rank=4, init="gradient")
    backward_with_grad(weight, grad)
    opt.step()
    s = opt.state[weight]
    torch.testing.assert_close(s["U"] @ torch.diag(s["S"]) @ s["V"].T, grad)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["reciprocal_s", "nesterov_ones_wd"])
def test_projected_linear_backward_matches_dense_reference(name, shape):
    """An nn.Linear weight on the projected path (no weight gradient): its 20-step trajectory, fed by two
    micro-batches a step, equals the float64 reference given the dense gradient dY^T X of the same batches."""
    rank = 5 if shape == (4, 10) else 3
    m, n = shape
    torch.manual_seed(0)
    layer = torch.nn.Linear(n, m, bias=False, dtype=torch.float64)
    options = {"lr": 0.05, "rank": rank, **OPTIONS[name]}
    opt = MoFaSGD([layer.weight], **options)
    ref = DenseMoFaSGD(layer.weight, **options)
    assert opt.attach(layer).projected() == ["weight"]
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        grad = torch.zeros(m, n, dtype=torch.float64)
        for _ in range(2):
            x = torch.randn(5, n, generator=gen, dtype=torch.float64)
            target = torch.randn(5, m, generator=gen, dtype=torch.float64)
            out = layer(x)
            grad += (out - target).detach().T @ x  # d/dW of 0.5 ||x W^T - target||^2
            (0.5 * (out - target).square().sum()).backward()
        assert layer.weight.grad is None
        opt.step()
        opt.zero_grad()
        ref.step(grad)
    assert_matches(layer.weight, opt, ref, tol=1e-8)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["reciprocal_s", "nesterov_ones_wd", "clamped_max_value"])
def test_capturable_step_matches_dense_reference(name, shape):
    """capturable=True (Jacobi core SVD, device-side panel fallback, device-side skip) is the same algorithm."""
    rank = 5 if shape == (4, 10) else 3
    weight, _, ref = make_pair(shape, rank, True, **OPTIONS[name])
    opt = MoFaSGD([weight], lr=0.05, rank=rank, capturable=True, **OPTIONS[name])
    run_trajectory(weight, opt, ref, steps=20)
    assert_matches(weight, opt, ref, tol=1e-8)
