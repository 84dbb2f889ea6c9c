"""The sync-free core SVD (mofasgd.jacobi_svd) against torch.linalg.svd: values, orthogonality, degenerate cores."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mofasgd.jacobi_svd import default_sweeps, jacobi_svd

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}


def _cores(n, dtype):
    gen = torch.Generator().manual_seed(n)
    cores = torch.randn(6, n, n, generator=gen, dtype=dtype)
    cores[1] *= torch.logspace(0, -5, n, dtype=dtype)  # graded columns: singular values over five decades
    cores[2, :, n // 2 :] = 0  # rank-deficient: half the singular values are zero
    cores[3] = 0  # all zero (a zero gradient and zero momentum)
    cores[4] = torch.diag(torch.linspace(1, 2, n, dtype=dtype)).flip(0)  # a permuted diagonal, ascending
    cores[5, :, 1] = cores[5, :, 0]  # two equal columns
    return cores


@pytest.mark.parametrize("n", [4, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_jacobi_svd_matches_lapack(n, dtype):
    cores = _cores(n, dtype)
    u, s, vh = jacobi_svd(cores)
    reference = torch.linalg.svdvals(cores)
    scale = reference[..., :1].clamp_min(1e-30)
    tol = TOLERANCE[dtype] * (n / 16) ** 0.5 if n > 16 else TOLERANCE[dtype]
    assert ((s - reference).abs() / scale).max() <= tol
    assert (s[..., :-1] >= s[..., 1:]).all()  # descending, like torch.linalg.svd
    eye = torch.eye(n, dtype=dtype)
    assert (u.mT @ u - eye).abs().max() <= 10 * tol  # orthogonal, the zero singular values' columns completed
    assert (vh @ vh.mT - eye).abs().max() <= 10 * tol
    rebuilt = (u * s.unsqueeze(-2)) @ vh
    assert ((rebuilt - cores).flatten(-2).norm(dim=-1) / scale.squeeze(-1)).max() <= 10 * tol


def test_top_singular_subspace_matches_lapack_on_a_momentum_core():
    """What the step keeps: the top-r directions of a 2r x 2r core whose values are well separated."""
    gen = torch.Generator().manual_seed(3)
    r = 8
    q1, _ = torch.linalg.qr(torch.randn(2 * r, 2 * r, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(2 * r, 2 * r, generator=gen))
    core = q1 @ torch.diag(torch.logspace(1, -3, 2 * r)) @ q2.mT
    u, s, vh = jacobi_svd(core)
    a, b, ch = torch.linalg.svd(core)
    for mine, ref in ((u[:, :r], a[:, :r]), (vh[:r].mT, ch[:r].mT)):
        overlap = (mine.mT @ ref).abs().diagonal()  # same directions up to sign
        torch.testing.assert_close(overlap, torch.ones(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(s[:r], b[:r], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, b, atol=1e-5 * b[0], rtol=0)  # all of them, relative to the largest


class _Ops(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_op_sequence_does_not_depend_on_the_data():
    """A CUDA graph replays a fixed sequence: the same ops for any core of a shape, and no host read among them."""
    jacobi_svd(torch.randn(3, 8, 8))  # the first call of a size builds its round-robin schedule
    sequences = []
    for cores in (torch.randn(3, 8, 8), torch.zeros(3, 8, 8), torch.eye(8).expand(3, 8, 8).clone()):
        with _Ops() as ops:
            jacobi_svd(cores)
        sequences.append(ops.names)
    assert sequences[0] == sequences[1] == sequences[2]
    assert not {"__bool__", "__float__", "__int__", "item", "tolist", "linalg_svd"} & set(sequences[0])
    assert len(sequences[0]) > default_sweeps(8, torch.float32) * 7  # every round of every sweep ran


@pytest.mark.parametrize("shape", [(5, 5), (4, 8), (8, 4), (3, 6)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_odd_and_rectangular_cores_match_lapack(shape):
    """A panel with fewer rows than 2r gives a k x 2r core: it is padded, and the pads never enter the factors."""
    cores = torch.randn(4, *shape, dtype=torch.float64)
    cores[1, :, -1] = 0  # rank-deficient
    cores[2] = 0
    u, s, vh = jacobi_svd(cores)
    ref_u, ref_s, ref_vh = torch.linalg.svd(cores, full_matrices=False)
    assert u.shape == ref_u.shape and s.shape == ref_s.shape and vh.shape == ref_vh.shape
    torch.testing.assert_close(s, ref_s, atol=1e-12, rtol=1e-10)
    kept = s.shape[-1]
    eye = torch.eye(kept, dtype=torch.float64).expand(4, kept, kept)
    torch.testing.assert_close(u.mT @ u, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(vh @ vh.mT, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close((u * s.unsqueeze(-2)) @ vh, cores, atol=1e-12, rtol=0)
