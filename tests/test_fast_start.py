"""The randomized top-r SVD initialisation (`init="weight_randomized"`, issue 13's fast start)."""

import pytest
import torch
from torch import nn

from mofasgd import MoFaSGD
from mofasgd import factor_math as fm


def decaying_matrix(m, n, seed=0, decades=6):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))[0]
    s = torch.logspace(0, -decades, min(m, n))
    return (u * s) @ v.T


def test_randomized_top_r_matches_the_exact_svd_on_a_decaying_spectrum():
    w = decaying_matrix(300, 200)
    exact = fm.top_singular_triplets(w, 8)
    approx = fm.randomized_top_singular_triplets(w, 8, torch.float32)
    torch.testing.assert_close(approx.S, exact.S, rtol=1e-3, atol=1e-6)
    # principal angles between the subspaces: cosines all ~1
    cosines = torch.linalg.svdvals(exact.U.T @ approx.U)
    assert cosines.min() > 0.99
    assert (approx.U.T @ approx.U - torch.eye(8)).abs().max() < 1e-5


def test_randomized_top_r_is_close_on_a_gently_decaying_spectrum():
    w = decaying_matrix(300, 200, decades=3)  # neighbouring singular values 3.5 % apart
    exact = fm.top_singular_triplets(w, 8)
    approx = fm.randomized_top_singular_triplets(w, 8, torch.float32)
    torch.testing.assert_close(approx.S, exact.S, rtol=2e-2, atol=0)


def test_weight_randomized_init_trains_like_the_exact_init():
    results = {}
    for init in ("weight", "weight_randomized"):
        w = nn.Parameter(decaying_matrix(64, 48))
        opt = MoFaSGD([w], lr=1e-2, rank=4, init=init)
        for step in range(5):
            (w * torch.randn(64, 48, generator=torch.Generator().manual_seed(step))).sum().backward()
            opt.step()
            opt.zero_grad()
        results[init] = w.detach().clone()
    torch.testing.assert_close(results["weight_randomized"], results["weight"], atol=1e-4, rtol=1e-3)


def test_weight_randomized_is_deterministic_so_data_parallel_ranks_agree():
    w = decaying_matrix(40, 30)
    a = fm.randomized_top_singular_triplets(w, 4, torch.float32, seed=3)
    b = fm.randomized_top_singular_triplets(w.clone(), 4, torch.float32, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    MoFaSGD([nn.Parameter(w)], init="weight_randomized", data_parallel=True)  # allowed, unlike init="gradient"


def test_unknown_init_names_the_choices():
    with pytest.raises(ValueError, match="weight_randomized"):
        MoFaSGD([nn.Parameter(torch.randn(4, 4))], init="svd")
