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

from functools import cache

import torch

# Sweeps for a core of each dtype: fp32 reaches its rounding level in 6-7 sweeps on random 16 x 16 .. 64 x 64 cores
# (tests/test_jacobi_svd.py); fp64 needs one or two more.
DEFAULT_SWEEPS = {torch.float32: 8, torch.float64: 10}


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
    """Per round, flat indices into an n x n matrix: the Gram entries read, and where the rotation's c, -s, s, c go."""
    out = []
    for left, right in _round_robin(n):
        p, q = torch.tensor(left), torch.tensor(right)
        gram = torch.cat([p * n + p, q * n + q, p * n + q])  # ||a_p||^2, ||a_q||^2, <a_p, a_q>
        # R[p, p] = R[q, q] = c, R[q, p] = -s, R[p, q] = s: A <- A R rotates columns p and q
        rotation = torch.cat([p * n + p, q * n + p, p * n + q, q * n + q])
        out.append((gram.to(device), rotation.to(device)))
    return tuple(out)


def jacobi_svd(matrix: torch.Tensor, sweeps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of each k x n matrix of a batch (..., k, n), S descending, like ``linalg.svd(full_matrices=False)``.

    U and V are orthogonal (U through a Householder QR of A V / S, which needs no host read and completes the
    columns of zero singular values); signs and the order of equal singular values may differ from LAPACK's, as
    for any SVD. The op count is fixed by the shape and `sweeps` (default :data:`DEFAULT_SWEEPS`), never by the
    data. A core that is not square of even size (a panel wider than tall makes it k x 2r) is padded with zeros.
    """
    k, n = matrix.shape[-2:]
    sweeps = DEFAULT_SWEEPS.get(matrix.dtype, 10) if sweeps is None else sweeps
    size = max(k, n) + max(k, n) % 2
    batch = matrix.shape[:-2]
    a = matrix.reshape(-1, k, n)
    if (k, n) != (size, size):  # zero rows and columns add zero singular values, and are never rotated in
        a = torch.nn.functional.pad(a, (0, size - n, 0, size - k))
    v = torch.eye(size, dtype=a.dtype, device=a.device).expand(a.shape[0], size, size)
    tiny = torch.finfo(a.dtype).tiny
    half = size // 2
    for _ in range(sweeps):
        for gram_at, rotation_at in _schedule(size, a.device):
            gram = (a.mT @ a).flatten(-2).index_select(-1, gram_at)
            alpha, beta, gamma = gram[:, :half], gram[:, half : 2 * half], gram[:, 2 * half : 3 * half]
            # the angle that zeroes the pair's inner product: tan(2 theta) = 2 gamma / (beta - alpha), smaller root
            diff = beta - alpha
            two_gamma = 2 * gamma
            t = two_gamma * torch.copysign(torch.ones_like(diff), diff) / (diff.abs() + torch.hypot(diff, two_gamma))
            t = torch.nan_to_num(t, nan=0.0)  # gamma = diff = 0 (both columns zero): no rotation
            c = torch.rsqrt(1 + t * t)
            s = c * t
            rotation = torch.zeros(a.shape[0], size * size, dtype=a.dtype, device=a.device)
            rotation.index_copy_(-1, rotation_at, torch.cat([c, -s, s, c], dim=-1))
            rotation = rotation.view(-1, size, size)
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
