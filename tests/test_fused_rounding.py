"""The compiled stochastic-rounding update (mofasgd.fused_rounding): hashed bits uniform and independent, the kernel
equal to its eager definition, unbiased, inside the optimizer it keeps the fp32 update, resumes exactly, and the
`rounding_kernel` option chooses, refuses and falls back as it says."""

import copy

import pytest
import torch
from torch import nn

from benchmarks import bf16_updates
from mofasgd import MoFaSGD, OptionError
from mofasgd import fused_rounding as fr

CHI2_BOUND = 255 + 6 * (2 * 255) ** 0.5  # chi-square with 255 degrees of freedom, ~6 sigma


def _seed(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int32)


def _chi2(values: torch.Tensor) -> float:
    counts = torch.bincount(values.long(), minlength=256).double()
    expected = values.numel() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_hashed_bits_are_uniform_independent_and_fixed_by_seed_and_index():
    count = 1 << 18
    bits = fr.counter_bits(_seed(7), 0, (count,), torch.device("cpu"))
    assert bits.dtype == torch.int32 and int(bits.min()) >= 0 and int(bits.max()) < 1 << 16
    assert _chi2(bits // 256) < CHI2_BOUND and _chi2(bits % 256) < CHI2_BOUND  # top and low 8 bits
    centred = bits.double() - (2**16 - 1) / 2
    for lag in (1, 2, 16, 4096):  # neighbours, and entries a row apart
        correlation = (centred[:-lag] * centred[lag:]).mean() / centred.square().mean()
        assert abs(float(correlation)) < 6 / count**0.5
    other = fr.counter_bits(_seed(8), 0, (count,), torch.device("cpu")).double() - (2**16 - 1) / 2
    assert abs(float((centred * other).mean() / centred.square().mean())) < 6 / count**0.5  # seeds independent
    # the bits of an entry depend on (seed, index) alone: a chunk at an offset draws the whole's slice
    assert torch.equal(fr.counter_bits(_seed(7), 1000, (4, 25), torch.device("cpu")).flatten(), bits[1000:1100])
    assert not torch.equal(bits[: count // 2], bits[count // 2 :])


def _inputs(m=48, n=40, k=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(m, n, generator=gen) * 0.02).bfloat16()
    left = torch.randn(m, k, generator=gen)
    right_t = torch.randn(k, n, generator=gen) * 1e-4
    return w, left, right_t, torch.tensor(-0.3), torch.tensor(0.999)


def test_the_compiled_kernel_equals_its_eager_definition_chunk_by_chunk(monkeypatch):
    """Compiled and eager draw the same bits; with chunks of 7 rows (a ragged last chunk) every entry still takes
    its own index's bits."""
    monkeypatch.setattr(fr, "row_chunks", lambda rows, cols: [(s, min(s + 7, rows)) for s in range(0, rows, 7)])
    w, left, right_t, alpha, decay = _inputs()
    compiled, eager = w.clone(), w.clone()
    fr.low_rank_update_(compiled, left, right_t, alpha, decay, torch.Generator().manual_seed(1))
    fr.low_rank_update_(eager, left, right_t, alpha, decay, torch.Generator().manual_seed(1), kernel=fr._update_rows)
    value = w.float() * decay + (left @ right_t) * alpha
    ulp = (value.abs() * 2.0**-7).clamp_min(2.0**-133)
    assert ((compiled.float() - value).abs() <= ulp).all()  # one of the two neighbouring bf16 values
    differ = (compiled != eager).float().mean()
    assert differ < 0.002, differ  # fp32 products may round differently at a boundary; the bits are the same
    assert not torch.equal(compiled, value.bfloat16())  # not round-to-nearest


def test_the_compiled_update_is_unbiased():
    w, left, right_t, alpha, decay = _inputs(m=32, n=32, k=4)
    value = (w.float() * decay + (left @ right_t) * alpha).double()
    total = torch.zeros_like(value)
    draws = 1500
    gen = torch.Generator().manual_seed(2)
    for _ in range(draws):
        out = w.clone()
        fr.low_rank_update_(out, left, right_t, alpha, decay, gen)
        total += out.double()
    mean = total / draws
    spacing = value.abs() * 2.0**-7
    # the standard error of a mean of two-point draws is at most spacing / (2 sqrt(draws))
    assert ((mean - value).abs() <= 5 * spacing / (2 * draws**0.5) + 1e-12).float().mean() > 0.995
    assert (mean - value).abs().mean() < 0.1 * (value.float().bfloat16().double() - value).abs().mean()


@pytest.mark.parametrize("use_ones", [True, False], ids=["ones", "reciprocal"])
def test_compiled_kernel_keeps_the_fp32_update_of_every_step_form(use_ones):
    def factory(w, lr, sr):
        return MoFaSGD(
            [w], lr=lr, rank=8, use_ones_for_nonzero_s=use_ones, stochastic_rounding=sr, rounding_kernel="compiled"
        )

    kept = bf16_updates.kept_fraction((256, 384), 20, 1e-5, None, factory)
    assert 0.9 <= kept <= 1.1


def _train(kernel: str, steps: int, state=None, seed: int = 0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Linear(32, 16)).bfloat16()
    opt = MoFaSGD(
        [{"params": [m.weight for m in model]}, {"params": [m.bias for m in model], "mofasgd": False}],
        lr=1e-3,
        rank=4,
        weight_decay=0.1,
        rounding_kernel=kernel,
        seed=seed,
    )
    opt.attach(model)
    start = [m.weight.detach().clone() for m in model]
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    gen = torch.Generator().manual_seed(5)
    saved = None
    for step in range(steps):
        x = torch.randn(8, 24, generator=gen).bfloat16()
        if state is not None and step < state["steps"]:
            continue
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 1:
            saved = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "opt": copy.deepcopy(opt.state_dict()),
                "steps": 2,
            }
    return model, opt, start, saved


def test_the_optimizer_takes_the_compiled_kernel_moves_every_matrix_and_resumes_exactly():
    model, opt, start, saved = _train("compiled", 5)
    assert opt.rounding_kernel.resolved() == {"cpu": "compiled"}
    for layer, before in zip(model, start):
        assert (layer.weight != before).float().mean() > 0.3  # each managed matrix moved (in most entries)
    resumed, _, _, _ = _train("compiled", 5, state=saved)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    eager, eager_opt, _, _ = _train("eager", 5)
    assert eager_opt.rounding_kernel.resolved() == {"cpu": "eager"}
    assert not torch.equal(eager[0].weight, model[0].weight)  # the kernels draw different bits


def test_auto_is_eager_on_the_cpu_and_a_bad_kernel_name_is_refused_naming_the_option():
    w = nn.Parameter(torch.randn(8, 8).bfloat16())
    assert MoFaSGD([w], rank=2).rounding_kernel.option == "auto"
    assert not MoFaSGD([w], rank=2).rounding_kernel.compiled(torch.device("cpu"))
    with pytest.raises(OptionError, match="rounding_kernel") as error:
        MoFaSGD([w], rank=2, rounding_kernel="triton")
    assert error.value.option == "rounding_kernel"


def _broken_kernel():
    def kernel(*args):
        raise RuntimeError("no C++ compiler (simulated)")

    return kernel


def test_a_compiled_kernel_that_does_not_build_is_an_error_by_name_and_a_warning_under_auto(monkeypatch):
    monkeypatch.setattr(fr, "_kernel", _broken_kernel)
    with pytest.raises(RuntimeError, match="mfsgd_rounding_kernel: compiled.*no C\\+\\+ compiler"):
        fr.KernelChoice("compiled").compiled(torch.device("cpu"))
    auto = fr.KernelChoice("auto")
    with pytest.warns(UserWarning, match="using the eager kernel"):
        assert auto._probe(torch.device("cpu")) == "eager"


def _adamw_inputs(shape=(40, 24), seed=0):
    gen = torch.Generator().manual_seed(seed)
    param = (torch.randn(*shape, generator=gen) * 0.02).bfloat16()
    grad = (torch.randn(*shape, generator=gen) * 1e-3).bfloat16()
    exp_avg = (torch.randn(*shape, generator=gen) * 1e-4).bfloat16()
    exp_avg_sq = (torch.rand(*shape, generator=gen) * 1e-7).bfloat16()
    return param, grad, exp_avg, exp_avg_sq


def test_the_compiled_adamw_side_update_rounds_torchs_adamw_step_and_equals_its_eager_definition():
    from mofasgd.adamw_side import AdamSettings

    settings = AdamSettings(1e-3, 0.9, 0.999, 1e-8, 0.1)
    param, grad, m, v = _adamw_inputs()
    g, m32, v32 = grad.float(), m.float(), v.float()
    m_new = m32 + (g - m32) * 0.1
    v_new = v32 * 0.999 + g * g * 0.001
    w_new = param.float() * (1 - 1e-4) - 1e-3 / (1 - 0.9**3) * m_new / (v_new.sqrt() / (1 - 0.999**3) ** 0.5 + 1e-8)
    outputs = {}
    for name, kernel in (("compiled", None), ("eager", fr._adamw_rows)):
        tensors = [t.clone() for t in (param, grad, m, v)]
        fr.adamw_update_(*tensors, 3, settings, torch.Generator().manual_seed(4), kernel=kernel)
        outputs[name] = tensors
    for out, expected in zip([outputs["compiled"][i] for i in (0, 2, 3)], (w_new, m_new, v_new)):
        ulp = (expected.abs() * 2.0**-7).clamp_min(2.0**-133)
        assert ((out.float() - expected).abs() <= ulp * 1.01).all()  # one of the two neighbouring bf16 values
    for compiled, eager in zip(outputs["compiled"], outputs["eager"]):
        assert (compiled != eager).float().mean() < 0.01
    skipped = [t.clone() for t in (param, grad, m, v)]
    skipped[1][0, 0] = float("nan")
    fr.adamw_update_(*skipped, 3, settings, torch.Generator(), allowed=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(skipped[::2], (param, m)))  # nothing moves on a skipped step
    assert torch.equal(skipped[3], v)


def test_the_compiled_adamw_side_keeps_the_fp32_update():
    def factory(w, lr, sr):
        return MoFaSGD([{"params": [w], "mofasgd": False}], lr=lr, stochastic_rounding=sr, rounding_kernel="compiled")

    kept = bf16_updates.kept_fraction((64, 512), 20, 1e-5, None, factory)
    assert 0.9 <= kept <= 1.1


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton kernels)")


@needs_cuda
def test_on_cuda_auto_compiles_the_kernels_and_they_equal_their_eager_definitions():
    """Run where a GPU is lent (`make gpu-quick`): Triton's kernels draw the CPU's bits and round the same values."""
    cuda = torch.device("cuda")
    bits = fr.counter_bits(_seed(11), 12345, (64, 96), cuda)
    assert torch.equal(bits.cpu(), fr.counter_bits(_seed(11), 12345, (64, 96), torch.device("cpu")))
    w, left, right_t, alpha, decay = (t.to(cuda) for t in _inputs(m=256, n=320, k=8))
    compiled, eager = w.clone(), w.clone()
    fr.low_rank_update_(compiled, left, right_t, alpha, decay, torch.Generator(cuda).manual_seed(1))
    fr.low_rank_update_(
        eager, left, right_t, alpha, decay, torch.Generator(cuda).manual_seed(1), kernel=fr._update_rows
    )
    assert (compiled != eager).float().mean() < 0.002
    layer = nn.Linear(320, 256, bias=False, device=cuda, dtype=torch.bfloat16)
    opt = MoFaSGD([layer.weight], lr=1e-3, rank=8)
    opt.attach(layer)
    layer(torch.randn(16, 320, device=cuda, dtype=torch.bfloat16)).float().square().mean().backward()
    opt.step()
    assert opt.rounding_kernel.resolved() == {"cuda": "compiled"}
