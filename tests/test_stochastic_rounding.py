"""Stochastic rounding of bf16 updates (issue 10): unbiased, keeps the fp32 update, bounded memory, exact resume."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks import bf16_updates  # the benchmark's measurement, so test and results measure the same thing
from llamafactory_mfsgd.gloo_exit import exit_spawned_worker
from llamafactory_mfsgd.launcher import free_port
from memory_profiling import transient_peak_bytes
from mofasgd import MoFaSGD, rounding
from mofasgd.adamw_side import AdamSettings, adamw_update_fp32_


def test_stochastic_rounding_is_unbiased_within_the_standard_error():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(512, generator=gen) * 0.02
    draws = 4000
    total = torch.zeros(512, dtype=torch.float64)
    total_sq = torch.zeros(512, dtype=torch.float64)
    target = torch.empty(512, dtype=torch.bfloat16)
    for _ in range(draws):
        rounding.stochastic_round_(target, values.clone(), gen)
        sample = target.double()
        total += sample
        total_sq += sample.square()
    mean = total / draws
    std_err = ((total_sq / draws - mean.square()).clamp_min(0) / draws).sqrt()
    error = (mean - values.double()).abs()
    # every sample is one of the two neighbouring bf16 values, and the mean sits on the fp32 value
    assert (error <= 5 * std_err + 1e-12).float().mean() > 0.995
    assert error.mean() < 0.1 * (values.double().abs() * 2**-8).mean()
    nearest = values.to(torch.bfloat16).double()
    assert (nearest - values.double()).abs().mean() > 10 * error.mean()  # round-to-nearest is biased per entry


@pytest.mark.parametrize("count", [1 << 16, 4099])  # a multiple of four lanes, and one that is not
def test_rounding_bits_are_uniform_and_independent_in_every_lane(count):
    """The 16-bit draws split from 64-bit words: each of the four lanes uniform, neighbours uncorrelated."""
    gen = torch.Generator().manual_seed(3)
    like = torch.empty(count)
    draws = torch.cat([rounding.random_low_bits(like, gen) for _ in range(64)])
    assert draws.dtype == torch.int32 and draws.shape == (64 * count,)
    assert int(draws.min()) >= 0 and int(draws.max()) < 1 << 16
    lanes = draws[: draws.numel() // 4 * 4].view(-1, 4).double()
    for lane in lanes.unbind(1):
        counts = torch.bincount((lane / 256).long(), minlength=256).double()  # top 8 bits: 256 bins
        expected = lane.numel() / 256
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 255 + 6 * (2 * 255) ** 0.5  # chi-square, 255 degrees of freedom, ~6 sigma
        low = torch.bincount((lane % 256).long(), minlength=256).double()  # the low 8 bits too
        assert ((low - expected) ** 2 / expected).sum() < 255 + 6 * (2 * 255) ** 0.5
    centred = draws.double() - (2**16 - 1) / 2
    for lag in (1, 2, 3, 4):  # within a word (1-3) and across words (4)
        correlation = (centred[:-lag] * centred[lag:]).mean() / centred.square().mean()
        assert abs(float(correlation)) < 6 / draws.numel() ** 0.5
    again = rounding.random_low_bits(like, torch.Generator().manual_seed(3))
    assert torch.equal(again, draws[:count])  # the seed alone fixes the bits (data-parallel replicas agree)


def test_stochastic_rounding_keeps_exactly_representable_values_and_signs():
    gen = torch.Generator().manual_seed(1)
    exact = torch.tensor([0.0, -1.0, 0.5, 2.0**-20, -3.0, float("inf")])
    target = torch.empty(6, dtype=torch.bfloat16)
    rounding.stochastic_round_(target, exact.clone(), gen)
    assert torch.equal(target.float(), exact)
    x = torch.full((10000,), -1.0 - 2.0**-10)  # between -1 - 2^-7 and -1
    rounding.stochastic_round_(out := torch.empty(10000, dtype=torch.bfloat16), x.clone(), gen)
    assert set(out.float().unique().tolist()) == {-1.0, -1.0 - 2.0**-7}


mofasgd, adamw = bf16_updates.mofasgd_factory, bf16_updates.adamw_factory
kept_fraction = bf16_updates.kept_fraction


@pytest.mark.slow
def test_bf16_mofasgd_on_a_llama_shaped_matrix_keeps_the_fp32_update_only_with_stochastic_rounding():
    shape = (1024, 2816)
    kept = kept_fraction(shape, 40, 1e-5, None, mofasgd(True))
    assert 0.9 <= kept <= 1.1
    lost = kept_fraction(shape, 40, 1e-5, False, mofasgd(True))
    assert lost < 0.1  # round-to-nearest throws the update away: what the test guards against


@pytest.mark.parametrize("use_ones", [True, False], ids=["ones", "reciprocal"])
def test_bf16_mofasgd_keeps_the_fp32_update_with_stochastic_rounding(use_ones):
    kept = kept_fraction((256, 384), 20, 1e-5, None, mofasgd(use_ones))
    assert 0.9 <= kept <= 1.1


def test_bf16_adamw_side_keeps_the_fp32_update_with_stochastic_rounding():
    kept = kept_fraction((64, 512), 20, 1e-5, None, adamw)
    assert 0.9 <= kept <= 1.1
    assert kept_fraction((64, 512), 20, 1e-5, False, adamw) < 0.9


def test_fp32_adamw_math_equals_torch_adamw():
    torch.manual_seed(0)
    ours = torch.randn(37, 5)
    ref = nn.Parameter(ours.clone())
    m, v = torch.zeros_like(ours), torch.zeros_like(ours)
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    for step in range(1, 8):
        g = torch.randn(37, 5)
        ref.grad = g.clone()
        torch_opt.step()
        adamw_update_fp32_(ours, g, m, v, step, AdamSettings(1e-2, 0.8, 0.99, 1e-6, 0.1), generator=None)
        torch.testing.assert_close(ours, ref.detach(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(m, torch_opt.state[ref]["exp_avg"], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "nonfused"])
def test_fp32_parameters_are_untouched_by_the_option(fused):
    results = []
    for sr in (True, False, None):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(20, 12))
        b = nn.Parameter(torch.randn(12))
        opt = MoFaSGD(
            [{"params": [w]}, {"params": [b], "mofasgd": False}], lr=1e-2, rank=3, fused=fused, stochastic_rounding=sr
        )
        for _ in range(4):
            ((w * torch.randn(20, 12)).sum() + (b * torch.randn(12)).sum()).backward()
            opt.step()
            opt.zero_grad()
        results.append((w.detach().clone(), b.detach().clone()))
        assert opt.state_dict().get("mofasgd_rng") is None  # no generator was ever used
    for w, b in results[1:]:
        assert torch.equal(w, results[0][0]) and torch.equal(b, results[0][1])


def test_stochastic_rounding_memory_is_bounded_by_the_chunk(monkeypatch):
    monkeypatch.setattr(rounding, "CHUNK_ELEMENTS", 1 << 12)
    w = nn.Parameter(torch.randn(512, 512).to(torch.bfloat16))
    opt = MoFaSGD([w], lr=1e-3, rank=4)
    (w * torch.randn(512, 512).to(torch.bfloat16)).sum().backward()
    peak = transient_peak_bytes(opt.step)
    # factors and the 2r x 2r core are tiny; an fp32 copy of the whole matrix alone would be 1 MiB
    assert peak < 512 * 512 * 4 / 4, peak


def test_generator_state_is_saved_and_the_explicit_off_switch_rounds_to_nearest():
    w = nn.Parameter(torch.randn(16, 8).to(torch.bfloat16))
    opt = MoFaSGD([w], lr=1e-3, rank=2, seed=5)
    (w * torch.randn(16, 8).to(torch.bfloat16)).sum().backward()
    opt.step()
    assert opt.state_dict()["mofasgd_rng"]["cpu"].dtype == torch.uint8
    w2 = nn.Parameter(torch.randn(16, 8).to(torch.bfloat16))
    off = MoFaSGD([w2], lr=1e-3, rank=2, stochastic_rounding=False)
    (w2 * torch.randn(16, 8).to(torch.bfloat16)).sum().backward()
    off.step()
    assert "mofasgd_rng" not in off.state_dict()


def test_stochastic_rounding_on_fp16_parameters_is_refused():
    with pytest.raises(ValueError, match="stochastic_rounding=True supports bf16"):
        MoFaSGD([nn.Parameter(torch.randn(4, 4).half())], stochastic_rounding=True)


# data-parallel replicas draw the same bits, so their bf16 weights stay identical
def _dp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        w = nn.Parameter((torch.randn(32, 24) * 0.02).to(torch.bfloat16))
        b = nn.Parameter(torch.zeros(24, dtype=torch.bfloat16))
        opt = MoFaSGD(
            [{"params": [w]}, {"params": [b], "mofasgd": False}], lr=1e-4, rank=4, data_parallel=True, seed=3
        )
        gen = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
        for _ in range(5):
            ((w * torch.randn(32, 24, generator=gen).to(torch.bfloat16)).sum()).backward()
            b.grad = torch.randn(24, generator=gen).to(torch.bfloat16)
            dist.all_reduce(b.grad)  # what DDP does for the AdamW side
            b.grad /= world
            opt.step()
            opt.zero_grad()
        torch.save({"w": w.detach(), "b": b.detach()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_spawned_worker()


@pytest.mark.distributed
def test_two_data_parallel_ranks_draw_identical_rounding_bits(tmp_path):
    mp.spawn(_dp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert torch.equal(r0["w"], r1["w"]) and torch.equal(r0["b"], r1["b"])
    torch.manual_seed(0)
    assert not torch.equal(r0["w"], (torch.randn(32, 24) * 0.02).to(torch.bfloat16))  # the weights did train
