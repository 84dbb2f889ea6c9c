"""The grouped step (matrices of one shape stepped together) equals stepping each matrix alone, with O(shapes)
solver calls per step (issue 13)."""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mofasgd import MoFaSGD

pytestmark = pytest.mark.usefixtures("both_panel_qr_forms")  # CPU and CUDA panel QR forms

SHAPES = [(12, 7), (12, 7), (7, 12), (12, 7), (9, 9), (7, 12)]
SOLVERS = {"aten::linalg_qr", "aten::_linalg_svd", "aten::linalg_eigh", "aten::linalg_cholesky_ex"}


def make_params(shapes=SHAPES, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(*shape, generator=gen, dtype=dtype)) for shape in shapes]


def grads(step, micro, shapes=SHAPES, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 * step + micro)
    return [torch.randn(*shape, generator=gen, dtype=dtype) for shape in shapes]


def step_both(opt, singles):
    """One step of the shared optimizer and of each single-matrix one."""
    for optimizer in (opt, *singles):
        optimizer.step()
        optimizer.zero_grad()


OPTIONS = {
    "plain": {},
    "nesterov_wd": {"nesterov": True, "weight_decay": 0.1},
    "ones_warmup": {"use_ones_for_nonzero_s": True, "beta_warmup_steps": 3, "beta_start": 0.5, "beta_end": 0.95},
    "eta2_current": {"eta2": 0.3, "use_current_projection": True, "fused": False},
    "gradient_init": {"init": "gradient"},
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "nonfused"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_grouped_step_equals_each_matrix_stepped_alone(options, fused):
    options = {"fused": fused, **options}
    if options["fused"] and options.get("eta2"):
        pytest.skip("eta2 needs fused=False")
    together = make_params()
    alone = make_params()
    opt = MoFaSGD(together, lr=0.05, rank=3, **options)
    singles = [MoFaSGD([p], lr=0.05, rank=3, **options) for p in alone]
    for step in range(5):
        for micro in range(2):
            for i, (a, b, g) in enumerate(zip(together, alone, grads(step, micro))):
                if step == 2 and i == 1:
                    continue  # one matrix misses a step: its step counter (and warm-up beta) falls behind
                (a * g).sum().backward()
                (b * g).sum().backward()
        step_both(opt, singles)
    for a, b, single in zip(together, alone, singles):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
        for key in ("U", "S", "V", "step"):
            torch.testing.assert_close(opt.state[a][key], single.state[b][key], atol=1e-10, rtol=1e-10)


def count_solver_calls(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name in SOLVERS)


def test_solver_calls_per_step_scale_with_shapes_not_matrices():
    shapes = [(32, 16)] * 12 + [(16, 32)] * 10 + [(24, 24)] * 6  # 28 matrices of 3 shapes
    params = make_params(shapes, torch.float32)
    opt = MoFaSGD(params, lr=0.01, rank=4, nesterov=True)
    for step in range(2):
        for p, g in zip(params, grads(step, 0, shapes, torch.float32)):
            (p * g).sum().backward()
        calls = count_solver_calls(opt.step)  # step 0 also initialises the factors (one SVD of each W)
        opt.zero_grad()
    assert calls <= 16, calls  # per shape: two batched QRs and two batched SVDs (nesterov)
    assert calls >= 3 * 2  # and the batched solvers do run


def test_non_finite_matrix_in_a_bucket_is_masked_without_disturbing_the_others(monkeypatch):
    together, alone = make_params(), make_params()
    opt = MoFaSGD(together, lr=0.05, rank=3)
    singles = [MoFaSGD([p], lr=0.05, rank=3) for p in alone]
    # step() skips a step with a non-finite gradient on the host first; this is the on-device mask behind it (the
    # one a step that reads nothing back to the host relies on)
    for optimizer in (opt, *singles):
        monkeypatch.setattr(optimizer, "_skip_nonfinite_step", lambda: False)
    for step in range(3):
        for i, (a, b, g) in enumerate(zip(together, alone, grads(step, 0))):
            if i == 0 and step == 1:
                g = g.clone()
                g[0, 0] = float("nan")
            (a * g).sum().backward()
            (b * g).sum().backward()
        step_both(opt, singles)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
        assert torch.isfinite(opt.state[a]["U"]).all()


def test_two_panels_share_their_cholesky_passes_and_fall_back_alone(monkeypatch):
    """CUDA's form: the U and V panels (different row counts) in one call; only the ill-conditioned one (a zero
    projection) is refactored by Householder QR, and both come out an exact thin QR."""
    import mofasgd.factor_math as fm

    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(3, 40, 4, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(3, 25, 4, generator=gen))[0]
    gv = 1e-3 * torch.randn(3, 40, 4, generator=gen)
    gtu = torch.randn(3, 25, 4, generator=gen)
    gtu[1] = 0  # batch entry 1 of the V panel is rank-deficient
    panels = [torch.cat([U, gv], -1), torch.cat([V, gtu], -1)]
    calls = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda a, *args, **kw: calls.append(a.shape) or real_qr(a, *args, **kw))
    (q_u, r_u, gram_u), (q_v, r_v, _) = fm.cholesky_qr2_panels(panels, [fm.LOCAL_ROWS, fm.LOCAL_ROWS])[0]
    assert calls == [torch.Size([1, 25, 8])]  # only entry 1 of the V panel fell back
    eye = torch.eye(8).expand(3, 8, 8)
    for q, r, panel in ((q_u, r_u, panels[0]), (q_v, r_v, panels[1])):
        torch.testing.assert_close(q.mT @ q, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(q @ r, panel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gram_u[..., :4, 4:], U.mT @ gv, atol=1e-7, rtol=1e-5)


def _top_level_ops(prof):
    """The aten ops issued from Python in a profile (an op inside another op is not counted again)."""
    return sum(
        1
        for event in prof.events()
        if event.name.startswith("aten::")
        and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))
    )


def _step_ops(count, dtype, **options):
    """Top-level aten ops one step() issues (the third, factors settled) for `count` matrices of one shape."""
    torch.manual_seed(0)
    params = [nn.Parameter((torch.randn(48, 32) * 0.1).to(dtype)) for _ in range(count)]
    opt = MoFaSGD(params, lr=1e-3, rank=4, **options)
    for _ in range(3):
        sum((p.float() * torch.randn(p.shape)).sum() for p in params).backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        opt.zero_grad()
    return _top_level_ops(prof)


@pytest.mark.parametrize(
    "dtype, options, most",
    [
        (torch.float32, {}, 1),  # addmm_ into the weight, and nothing else
        (torch.float32, {"weight_decay": 0.1}, 2),  # + the decay
        # fp32 copy, random bits, decay, addmm_, rounding (one chunk); the CPU's random bits are 6 ops (64-bit
        # words split into 16-bit lanes, cheaper than randint on mt19937), CUDA's one randint; rounding is 5 (the
        # add, then views of the high halves and one copy: no kernel for the views, one memory pass fewer)
        (torch.bfloat16, {"weight_decay": 0.1}, 18),
    ],
    ids=["fp32", "fp32_wd", "bf16_stochastic_rounding_wd"],
)
def test_each_extra_matrix_adds_only_its_weight_update_to_the_step(dtype, options, most):
    """On a GPU the step is bound by op launches (results/layer_step_cuda.md): per matrix, only the weight update
    may cost ops; factors, decay and step counters are handled once per bucket."""
    per_matrix = (_step_ops(8, dtype, **options) - _step_ops(4, dtype, **options)) / 4
    assert per_matrix <= most, per_matrix


def _twin_steps(clip_norm, log_midway):
    """Four 12x7 matrices and a 7x12 one with a bias on the AdamW side, two micro-batches per step. With `clip_norm`
    the optimizer clips; its twin gets the gradients pre-scaled by the returned coefficient instead."""
    shapes = [(12, 7)] * 4 + [(7, 12)]
    clipped, twin = make_params(shapes), make_params(shapes)
    bias_a, bias_b = nn.Parameter(torch.ones(7, dtype=torch.float64)), nn.Parameter(torch.ones(7, dtype=torch.float64))
    opt = MoFaSGD([{"params": clipped}, {"params": [bias_a], "mofasgd": False}], lr=0.05, rank=3)
    ref = MoFaSGD([{"params": twin}, {"params": [bias_b], "mofasgd": False}], lr=0.05, rank=3)
    for step in range(3):
        micro_grads = [grads(step, micro, shapes) for micro in range(2)]
        micro_grads[0][2] = torch.zeros_like(micro_grads[0][2])  # matrix 2 first gets a gradient in micro-batch 1
        bias_grads = [torch.full((7,), 10.0 + micro, dtype=torch.float64) for micro in range(2)]
        for micro in range(2):
            used = [(p, g) for i, (p, g) in enumerate(zip(clipped, micro_grads[micro])) if micro or i != 2]
            (sum((p * g).sum() for p, g in used) + (bias_a * bias_grads[micro]).sum()).backward()
            if log_midway and micro == 0:
                opt.grad_norm()  # a norm read between micro-batches: the next hooks must invalidate its buckets
        norm = float(opt.clip_grad_norm_(clip_norm))
        coef = min(1.0, clip_norm / (norm + 1e-6))
        for micro in range(2):
            scaled = [coef * g for g in micro_grads[micro]]
            (sum((p * g).sum() for p, g in zip(twin, scaled)) + (bias_b * coef * bias_grads[micro]).sum()).backward()
        for p, q in zip(clipped, twin):  # the pending sums in the state are the clipped ones
            torch.testing.assert_close(opt.state[p]["GV"], ref.state[q]["GV"], atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(opt.state[p]["GtU"], ref.state[q]["GtU"], atol=1e-12, rtol=1e-12)
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    return clipped + [bias_a], twin + [bias_b]


@pytest.mark.parametrize("log_midway", [False, True], ids=["clip", "norm_between_micro_batches"])
def test_clipping_scales_every_matrix_of_a_bucket_once(log_midway):
    """grad_norm, clipping and step share one stacking of each bucket: clipping scales the stacks, which the pending
    sums in the state are views of; a hook after a norm read starts over."""
    clipped, twin = _twin_steps(0.5, log_midway)
    for a, b in zip(clipped, twin):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_norm_clip_and_step_stack_nothing(both_panel_qr_forms):
    """With factors settled, grad_norm, clipping and the step stack nothing: the hooks write each bucket's
    projections into its intake buffers, and the factors are read as slices of the last step's batched results."""
    shapes = [(32, 16)] * 4 + [(16, 32)] * 3
    params = make_params(shapes, torch.float32)
    opt = MoFaSGD(params, lr=0.01, rank=4)
    for step in range(3):
        for p, g in zip(params, grads(step, 0, shapes, torch.float32)):
            (p * 100 * g).sum().backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            norm = opt.clip_grad_norm_(1.0)
            opt.step()
        opt.zero_grad()
    assert float(norm) > 1.0  # clipping scaled the stacks
    stacks = sum(1 for event in prof.events() if event.name == "aten::stack")
    grams = 2 * 2 if both_panel_qr_forms == "cholesky_qr2" else 0  # CholeskyQR2 stacks both panels' Grams, twice
    assert stacks == grams, stacks


def test_cholesky_qr2_fallback_is_read_after_the_cores_svd(monkeypatch):
    """On CUDA torch's batched SVD waits for the device (it checks convergence on the host): the CholeskyQR2
    fallback flags are read after it, and a bucket with a zero projection is redone with the fallback, equal to the
    Householder form."""
    import mofasgd.factor_math as fm

    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(3, 40, 4, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(3, 25, 4, generator=gen, dtype=torch.float64))[0]
    S = torch.rand(3, 4, generator=gen, dtype=torch.float64).sort(-1, descending=True).values
    gv = torch.randn(3, 40, 4, generator=gen, dtype=torch.float64)
    gtu = torch.randn(3, 25, 4, generator=gen, dtype=torch.float64)
    gtu[1] = 0  # entry 1's V panel is rank-deficient: CholeskyQR2 fails there
    monkeypatch.setattr(fm, "CHOLESKY_QR_DEVICES", set())
    expected = fm.momentum_step(U, S, V, gv, gtu, 0.9, 4, nesterov=True)
    monkeypatch.setattr(fm, "CHOLESKY_QR_DEVICES", {"cpu"})
    events = []
    real_svd, real_bool = torch.linalg.svd, torch.Tensor.__bool__
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: events.append("svd") or real_svd(*a, **k))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: events.append("host read") or real_bool(t))
    new, direction = fm.momentum_step(U, S, V, gv, gtu, 0.9, 4, nesterov=True)
    monkeypatch.undo()
    assert events[0] == "svd" and "host read" in events, events
    assert events.count("svd") == 3, events  # the attempt, its redo with the fallback, the Nesterov look-ahead
    for got, want in zip((new, direction), expected):  # compared as matrices: singular vectors are up to sign
        torch.testing.assert_close(got.U * got.S.unsqueeze(-2) @ got.V.mT, want.U * want.S.unsqueeze(-2) @ want.V.mT)
        torch.testing.assert_close(got.S, want.S)


def _clip_ops(count):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(48, 32) * 0.1) for _ in range(count)]
    opt = MoFaSGD(params, lr=1e-3, rank=4)
    for _ in range(3):
        sum((p * 100 * torch.randn(p.shape)).sum() for p in params).backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    return _top_level_ops(prof)


def test_clipping_costs_the_same_ops_for_any_number_of_matrices_of_a_shape():
    """The tangent norms and the scaling run on the bucket's stacks (the stacking itself is one op per tensor)."""
    assert _clip_ops(8) == _clip_ops(4)


def test_state_saved_between_clipping_and_step_resumes_exactly(tmp_path):
    """After clipping, the pending sums in the state are views of the bucket stacks: a checkpoint taken there holds
    the clipped sums, and a resumed optimizer steps every matrix to the same weights and factors."""
    shapes = [(12, 7)] * 3 + [(7, 12)]
    params, resumed_params = make_params(shapes), make_params(shapes)
    opt = MoFaSGD(params, lr=0.05, rank=3)
    for step in range(2):
        for p, g in zip(params, grads(step, 0, shapes)):
            (p * 50 * g).sum().backward()
        assert float(opt.clip_grad_norm_(1.0)) > 1.0  # the stacks were scaled
        if step == 1:
            torch.save(opt.state_dict(), tmp_path / "opt.pt")
            with torch.no_grad():
                for p, q in zip(params, resumed_params):
                    q.copy_(p)
        opt.step()
        opt.zero_grad()
    resumed = MoFaSGD(resumed_params, lr=0.05, rank=3)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    resumed.step()
    for p, q, start in zip(params, resumed_params, make_params(shapes)):
        assert not torch.equal(p, start)  # every matrix moved
        torch.testing.assert_close(q, p, atol=1e-12, rtol=1e-12)
        for key in ("U", "S", "V"):
            torch.testing.assert_close(resumed.state[q][key], opt.state[p][key], atol=1e-12, rtol=1e-12)


def test_skipping_the_finite_masks_on_the_cpu_changes_no_bit(monkeypatch):
    """On the CPU an all-finite bucket skips the masking copies (the flags are read for free); forcing the masks
    gives the same weights and factors bit for bit."""
    import mofasgd.bucket_step as bucket_step

    runs = []
    for free_reads in ({"cpu"}, set()):
        monkeypatch.setattr(bucket_step, "_FREE_HOST_READS", free_reads)
        params = make_params()
        opt = MoFaSGD(params, lr=0.05, rank=3, weight_decay=0.1)
        for step in range(3):
            for p, g in zip(params, grads(step, 0)):
                (p * g).sum().backward()
            opt.step()
            opt.zero_grad()
        runs.append((params, opt))
    (ours, opt_a), (masked, opt_b) = runs
    for a, b, start in zip(ours, masked, make_params()):
        assert (a - start).norm() > 1e-3 * start.norm()  # every matrix moved
        assert torch.equal(a, b)
        for key in ("U", "S", "V"):
            assert torch.equal(opt_a.state[a][key], opt_b.state[b][key])
