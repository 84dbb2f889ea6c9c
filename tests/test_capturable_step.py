"""capturable=True: clipping and the step read nothing on the host and call no syncing solver, and give the eager
step's results to fp32 rounding (issue 23)."""

import logging

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mofasgd import MoFaSGD
from mofasgd import factor_math as fm

# Tensor methods that copy a value to the host (on CUDA: wait for the stream), and ops whose CUDA kernels do
HOST_READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu", "nonzero"}
SYNCING_SOLVERS = {
    "linalg_svd",
    "linalg_svdvals",
    "svd",
    "linalg_eigh",
    "linalg_eigvalsh",
    "linalg_eig",
    "linalg_cholesky",
    "cholesky",
    "linalg_inv",
    "inverse",
    "linalg_solve",
    "linalg_lstsq",
    "masked_select",
    "unique",
}


class HostReads(TorchFunctionMode):
    """Records every host read and syncing solver call made through torch's Python API while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        index = args[1] if name == "__getitem__" and isinstance(args[1], tuple) else args[1:2]
        boolean_index = name == "__getitem__" and any(torch.is_tensor(a) and a.dtype == torch.bool for a in index)
        if name in HOST_READS or name in SYNCING_SOLVERS or boolean_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


SHAPES = [(24, 16), (24, 16), (16, 24), (24, 16), (20, 20)]


def _model(dtype):
    gen = torch.Generator().manual_seed(0)
    matrices = [nn.Parameter((torch.randn(*s, generator=gen) * 0.2).to(dtype)) for s in SHAPES]
    embedding = nn.Parameter((torch.randn(30, 16, generator=gen) * 0.2).to(dtype))
    bias = nn.Parameter(torch.zeros(16, dtype=dtype))
    return matrices, [embedding, bias]


def _backward(matrices, side, step, nan=False):
    gen = torch.Generator().manual_seed(100 + step)
    loss = sum((p.float() * torch.randn(p.shape, generator=gen)).sum() for p in matrices + side)
    loss = loss + sum((p.float() ** 2).sum() for p in matrices[:2])  # a gradient that depends on the weight
    if nan:
        loss = loss + matrices[3].float()[0, 0] * float("nan")
    loss.backward()


OPTIONS = {
    "plain": {},
    "nesterov_wd_warmup_guard": {
        "nesterov": True,
        "weight_decay": 0.1,
        "beta_warmup_steps": 4,
        "beta_start": 0.5,
        "beta_end": 0.9,
        "min_gradient_support": 0.01,
    },
    "ones_nonfused_eta2": {"use_ones_for_nonzero_s": True, "fused": False, "eta2": 0.2},
}


def _optimizer(matrices, side, capturable, **options):
    return MoFaSGD(
        [{"params": matrices}, {"params": side, "mofasgd": False, "lr": 3e-3}],
        lr=2e-2,
        rank=4,
        capturable=capturable,
        **options,
    )


@pytest.fixture(params=["householder", "cholesky_qr2"])
def panel_qr(request, monkeypatch):
    """The CPU's panel QR (Householder) and CUDA's (CholeskyQR2, whose fallback is then chosen on the device)."""
    if request.param == "cholesky_qr2":
        monkeypatch.setattr(fm, "CHOLESKY_QR_DEVICES", {"cpu", "cuda"})
    return request.param


@pytest.mark.parametrize(
    ("dtype", "kernel"),
    [(torch.float32, "eager"), (torch.bfloat16, "eager"), (torch.bfloat16, "compiled")],
    ids=["fp32", "bf16_stochastic_rounding", "bf16_compiled_rounding"],
)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_clip_and_step_read_nothing_on_the_host(options, dtype, kernel, panel_qr):
    matrices, side = _model(dtype)
    opt = _optimizer(matrices, side, True, **options, rounding_kernel=kernel)
    for step in range(4):
        _backward(matrices, side, step, nan=step == 3)  # the last step is skipped: on the device too
        counted = step >= 2  # after warm-up: the first step initialises the factors (one SVD of each weight)
        with HostReads() as reads:
            opt.clip_grad_norm_(1.0)
            opt.step()
        opt.zero_grad()
        if counted:
            assert reads.calls == [], reads.calls


def _run(capturable, options, dtype, steps=6, nan_at=None):
    matrices, side = _model(dtype)
    opt = _optimizer(matrices, side, capturable, **options)
    for step in range(steps):
        _backward(matrices, side, step, nan=step == nan_at)
        opt.clip_grad_norm_(5.0)
        opt.step()
        opt.zero_grad()
    return matrices, side, opt


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_capturable_step_equals_the_eager_one(options, panel_qr):
    eager, captured = _run(False, options, torch.float32), _run(True, options, torch.float32)
    for p, q in zip(eager[0] + eager[1], captured[0] + captured[1]):
        torch.testing.assert_close(q, p, atol=2e-6, rtol=2e-5)
    for p, q in zip(eager[0], captured[0]):  # the momentum itself (factor signs may differ from LAPACK's)
        a, b = eager[2].state[p], captured[2].state[q]
        momentum = [(st["U"] * st["S"].unsqueeze(-2)) @ st["V"].mT for st in (a, b)]
        torch.testing.assert_close(momentum[1], momentum[0], atol=1e-5, rtol=1e-4)
        assert float(a["step"]) == float(b["step"])
    for p, q in zip(eager[1], captured[1]):  # the AdamW side (torch's fused kernel there)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(captured[2].state[q][key].cpu(), eager[2].state[p][key], atol=1e-6, rtol=1e-5)


def test_every_matrix_moved_as_far_as_in_the_eager_step():
    start = _model(torch.float32)
    eager, captured = _run(False, {}, torch.float32), _run(True, {}, torch.float32)
    for p0, p, q in zip(start[0], eager[0], captured[0]):
        moved, twin = (q - p0).norm(), (p - p0).norm()
        assert moved > 0.9 * twin > 0


def test_bf16_capturable_step_stays_close_to_the_eager_one():
    """Stochastic rounding draws the same bits in both; the masked fp32 AdamW-side formulas round differently."""
    eager, captured = _run(False, {}, torch.bfloat16), _run(True, {}, torch.bfloat16)
    start = _model(torch.bfloat16)
    for p0, p, q in zip(start[0] + start[1], eager[0] + eager[1], captured[0] + captured[1]):
        change, gap = (p.float() - p0.float()).norm(), (q.float() - p.float()).norm()
        assert change > 0
        assert gap <= 0.05 * change, (gap, change)


def test_a_non_finite_gradient_skips_the_whole_step_on_the_device(caplog):
    before = _run(True, {}, torch.float32, steps=3)
    skipped = _run(True, {}, torch.float32, steps=4, nan_at=3)
    for p, q in zip(before[0] + before[1], skipped[0] + skipped[1]):
        torch.testing.assert_close(q, p, atol=0, rtol=0)
    for p, q in zip(before[0] + before[1], skipped[0] + skipped[1]):
        for key, value in before[2].state[p].items():
            torch.testing.assert_close(skipped[2].state[q][key], value, atol=0, rtol=0)
    opt = skipped[2]
    with caplog.at_level(logging.WARNING, logger="mofasgd"):
        opt.request_diagnostics()
        opt.pop_diagnostics()  # a logging step reads the skip count
    assert "skipped 1 optimizer step" in caplog.text


def test_capturable_refuses_what_reads_the_host_at_every_step():
    matrices, side = _model(torch.float32)
    with pytest.raises(ValueError, match="fused_adamw_side"):
        MoFaSGD(matrices, capturable=True, fused_adamw_side=True)
    with pytest.raises(ValueError, match="adamw_state='factored'.*capturable"):
        MoFaSGD([{"params": matrices}, {"params": side, "mofasgd": False}], capturable=True, adamw_state="factored")
    with pytest.raises(ValueError, match="Invalid capturable"):
        MoFaSGD(matrices, capturable="yes")


def test_a_scheduled_learning_rate_reaches_the_capturable_step():
    """The learning rate is read from a device tensor that step() refills, so a scheduler's change takes effect."""
    runs = []
    for capturable in (False, True):
        matrices, side = _model(torch.float32)
        opt = _optimizer(matrices, side, capturable, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        for step in range(5):
            _backward(matrices, side, step)
            opt.step()
            schedule.step()
            opt.zero_grad()
        runs.append(matrices + side)
    for p, q in zip(*runs):
        torch.testing.assert_close(q, p, atol=2e-6, rtol=2e-5)


def test_the_capturable_step_keeps_its_tensors_at_fixed_addresses():
    """What a replayed CUDA graph needs: after warm-up, the factors, counters, moments and pending sums stay put."""
    matrices, side = _model(torch.float32)
    opt = _optimizer(matrices, side, True, nesterov=True)

    def addresses():
        tensors = [t for p in matrices + side for t in opt.state[p].values() if torch.is_tensor(t)]
        counters = [opt._nonfinite, opt._skipped_steps]  # the skip counts, added to in place
        return [t.data_ptr() for t in tensors + opt.intake.buffers() + list(opt._lrs.values()) + counters]

    seen = []
    for step in range(5):
        _backward(matrices, side, step)
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        seen.append(addresses())
        if step == 3:
            opt.request_diagnostics()
            opt.pop_diagnostics()  # a logging step reads and resets the counters, in place
    assert seen[2] == seen[3] == seen[4]
    assert len(seen[4]) >= 4 * len(matrices) + 3 * len(side) + 3
