"""A batched SVD of small square matrices that never waits for the host: one-sided Jacobi with a fixed sweep count.

MoFaSGD's core is 2r x 2r whatever the matrix shape. ``torch.linalg.svd`` on CUDA copies its convergence flags to
the host on every call, which blocks CUDA-graph capture and stalls the stream; this factorisation issues only
matmuls, gathers and elementwise ops, a fixed number of them, so it can be captured and replayed.

One-sided Jacobi (Hestenes 1958): columns i, j of A are rotated until orthogonal; after enough sweeps over all
pairs, A V = U diag(S) with orthogonal V. The pairs of a sweep are scheduled round-robin, n / 2 disjoint pairs per
round, so each round is one batched rotation of all pairs at once (n - 1 rounds per sweep). Convergence is
quadratic once the columns are nearly orthogonal; accuracy against ``torch.linalg.svd`` is measured in
tests/test_jacobi_svd.py (and by ``python -m benchmarks.jacobi_svd`` where that exists).
"""

from __future__ import annotations

import math
from functools import cache

import torch


def default_sweeps(size: int, dtype: torch.dtype) -> int:
    """Sweeps that reach the dtype's rounding level on a size x size core: 7 up to 16 (rank 8), one more per doubling.

    Measured (tests/test_jacobi_svd.py): fp32 cores need 6 sweeps at 16 (7 for singular values spread over four
    decades, whose smallest converge last) and 8 at 64; MoFaSGD's own cores (a decaying momentum plus a gradient)
    5 at 16; fp64 two more.
    """
    return 7 + max(0, math.ceil(math.log2(max(size, 1) / 16))) + (2 if dtype == torch.float64 else 0)


@cache
def _round_robin(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """The n - 1 rounds of a round-robin tournament of n (even) columns: per round, the left and right members."""
    players = list(range(n))
    rounds = []
    for _ in range(n - 1):
        half = n // 2
        rounds.append((tuple(players[:half]), tuple(reversed(players[half:]))))
        players = [players[0], players[-1], *players[1:-1]]  # keep the first, rotate the others by one
    return tuple(rounds)


@cache
def _schedule(n: int, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per round: the flat indices of the Gram entries read, and the 0/1 matrix that places a rotation's entries.

    The Gram entries are ||a_p||^2, ||a_q||^2 and <a_p, a_q> of each pair. The placing matrix (4 n/2 x n^2) puts
    (c, -s, s, c) at R[p, p], R[q, p], R[p, q], R[q, q], so that A <- A R rotates columns p and q (one matmul
    builds R).
    """
    out = []
    for left, right in _round_robin(n):
        p, q = torch.tensor(left), torch.tensor(right)
        gram = torch.cat([p * n + p, q * n + q, p * n + q])
        places = torch.cat([p * n + p, q * n + p, p * n + q, q * n + q])
        scatter = torch.zeros(len(places), n * n)
        scatter[torch.arange(len(places)), places] = 1.0
        out.append((gram.to(device), scatter.to(device)))
    return tuple(out)


def jacobi_svd(matrix: torch.Tensor, sweeps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of each k x n matrix of a batch (..., k, n), S descending, like ``linalg.svd(full_matrices=False)``.

    U and V are orthogonal (U through a Householder QR of A V / S, which needs no host read and completes the
    columns of zero singular values); signs and the order of equal singular values may differ from LAPACK's, as
    for any SVD. The op count is fixed by the shape and `sweeps` (default :func:`default_sweeps`), never by the
    data. A core that is not square of even size (a panel wider than tall makes it k x 2r) is padded with zeros.
    """
    k, n = matrix.shape[-2:]
    size = max(k, n) + max(k, n) % 2
    sweeps = default_sweeps(size, matrix.dtype) if sweeps is None else sweeps
    batch = matrix.shape[:-2]
    a = matrix.reshape(-1, k, n)
    if (k, n) != (size, size):  # zero rows and columns add zero singular values, and are never rotated in
        a = torch.nn.functional.pad(a, (0, size - n, 0, size - k))
    v = torch.eye(size, dtype=a.dtype, device=a.device).expand(a.shape[0], size, size)
    tiny = torch.finfo(a.dtype).tiny
    schedule = [(gram_at, scatter.to(a.dtype)) for gram_at, scatter in _schedule(size, a.device)]
    for _ in range(sweeps):
        for gram_at, scatter in schedule:
            alpha, beta, gamma = (a.mT @ a).flatten(-2).index_select(-1, gram_at).view(-1, 3, size // 2).unbind(1)
            # the angle that zeroes the pair's inner product, tan(2 theta) = 2 gamma / (beta - alpha), by its smaller
            # root t = 2 gamma / (d + sign(d) hypot(d, 2 gamma)); 0 / 0 (both columns zero) is no rotation
            diff, two_gamma = beta - alpha, 2 * gamma
            t = torch.nan_to_num(two_gamma / (diff + torch.copysign(torch.hypot(diff, two_gamma), diff)), nan=0.0)
            c = torch.rsqrt(1 + t * t)
            s = c * t
            rotation = (torch.cat([c, -s, s, c], dim=-1) @ scatter).view(-1, size, size)
            a = a @ rotation
            v = v @ rotation
    norms = torch.linalg.vector_norm(a, dim=-2)
    order = norms.argsort(dim=-1, descending=True, stable=True)  # equal norms keep their order: pads come last
    s = norms.gather(-1, order)
    a = a.gather(-1, order.unsqueeze(-2).expand_as(a))
    v = v.gather(-1, order.unsqueeze(-2).expand_as(v))
    # U = A V / S, made orthonormal by a Householder QR (which reads nothing back): it removes the rounding of the
    # small singular values' columns and, where S is zero, completes the basis from a column of the identity. The
    # columns come in descending S, so each keeps its direction (up to the sign, restored from R's diagonal).
    alive = s.unsqueeze(-2) > tiny
    u = torch.where(alive, a / s.clamp_min(tiny).unsqueeze(-2), torch.eye(size, dtype=a.dtype, device=a.device))
    q, r = torch.linalg.qr(u)
    u = q * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(a.dtype).unsqueeze(-2)
    kept = min(k, n)
    u, s, vh = u[:, :k, :kept], s[:, :kept], v.mT[:, :kept, :n]
    return u.reshape(*batch, k, kept), s.reshape(*batch, kept), vh.reshape(*batch, kept, n)
