"""Pure functions behind MoFaSGD: projections, the 2r x 2r momentum core, step scaling, initialisation.

Notation (docs/algorithm.md): a managed matrix W is m x n, its momentum M ~= U diag(S) V^T with U (m x r) and
V (n x r) orthonormal. A gradient G enters only through GV = G V (m x r) and GtU = G^T U (n x r); both are
linear in G, so they can be summed over micro-batches and averaged over data-parallel ranks exactly.
Every function here costs O((m + n) r^2) time and memory, never O(m n), except the projection of G itself.
The momentum functions accept leading batch dimensions (B x m x r, B x r, ...), so matrices of one shape can
be stepped together with one batched QR and one batched SVD per group.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NamedTuple, Protocol

import torch

from mofasgd.jacobi_svd import jacobi_svd


class MomentumCore(NamedTuple):
    """beta M + G_hat = Q_U @ K @ Q_V^T, kept factored; G_core is the same for G_hat alone (beta = 0)."""

    q_u: torch.Tensor
    q_v: torch.Tensor
    core: torch.Tensor
    grad_core: torch.Tensor


class LowRank(NamedTuple):
    """A rank-r matrix U diag(S) V^T with orthonormal U, V (singular values in S, descending)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


class RowReduction(Protocol):
    """How a row-sharded panel's pieces meet (sharding.RowGroup): sum small matrices, or gather the rows."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce a small tensor in place (SUM over the ranks holding the rows) and return it."""

    def gather(self, piece: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of a panel (..., rows, k), in order: the whole panel."""

    def mine(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole panel."""

    def total(self, piece: torch.Tensor) -> int:
        """How many rows the whole panel has, of which `piece` holds this rank's."""


class LocalRows:
    """The RowReduction of a panel whose rows all live in this process: there is nothing to reduce."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor itself."""
        return tensor

    def gather(self, piece: torch.Tensor) -> torch.Tensor:
        """The piece is the whole panel."""
        return piece

    def mine(self, full: torch.Tensor) -> torch.Tensor:
        """All rows are this process's."""
        return full

    def total(self, piece: torch.Tensor) -> int:
        """The piece's own row count."""
        return piece.shape[-2]


LOCAL_ROWS = LocalRows()

# Device types whose unsharded panels go through CholeskyQR2 (batched GEMMs and a batched 2r x 2r Cholesky)
# instead of a batched Householder QR, which CUDA runs one matrix at a time. Chosen per device by measurement:
# python -m benchmarks.layer_step --qr (results/layer_step_cuda.md). Sharded panels use CholeskyQR2 unless wide.
CHOLESKY_QR_DEVICES: set[str] = {"cuda"}

# CholeskyQR2 is accurate to O(eps) when cond(A) < ~eps^-1/2 (Yamamoto et al. 2015): ~4e3 in fp32. Panels whose
# column-scaled R has diag(R) spread by more than this fall back to a Householder QR of the gathered rows.
_CHOLESKY_QR_MAX_SPREAD = {torch.float32: 1e3, torch.float64: 1e6}


def cholesky_qr2(panel: torch.Tensor, rows: RowReduction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin QR of a tall panel whose rows are spread over ranks: (local rows of Q, R, the Gram A^T A).

    Only k x k Gram matrices (k = panel width) cross ranks. The columns are scaled to unit norm first, so a
    panel of an orthonormal U beside a small G V is not mistaken for an ill-conditioned one; a panel that is
    ill-conditioned after scaling (G V nearly inside span(U), a zero gradient) or whose Cholesky fails is
    factored instead by Householder QR of the whole panel, all-gathered (m k numbers) - identical on every rank
    since the decision is made from all-reduced numbers. Batched over leading dimensions.
    """
    return cholesky_qr2_panels([panel], [rows])[0][0]


def cholesky_qr2_panels(
    panels: list[torch.Tensor], reductions: list[RowReduction], settle: bool = True
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """:func:`cholesky_qr2` of several panels of one width and batch shape (any row counts) at once.

    Their Grams are stacked, so each pass runs one batched Cholesky for all of them. Returns the (Q, R, Gram) of
    each panel and None; with ``settle=False`` the Householder fallback is left to :func:`settle_panels` and the
    flags it needs (panel x batch entries) are returned instead of None, so the caller picks when to read them.
    """
    grams = torch.stack([rows.sum(panel.mT @ panel) for panel, rows in zip(panels, reductions)])
    norms = torch.diagonal(grams, dim1=-2, dim2=-1).clamp_min(torch.finfo(grams.dtype).tiny).sqrt()
    scaled = grams / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
    r1, info1 = torch.linalg.cholesky_ex(scaled, upper=True)
    r1 = r1 * norms.unsqueeze(-2)  # R of the unscaled panel: A = Q1 (R1' D^-1)
    q1 = [torch.linalg.solve_triangular(r1[i], panel, upper=True, left=False) for i, panel in enumerate(panels)]
    r2, info2 = torch.linalg.cholesky_ex(
        torch.stack([rows.sum(q.mT @ q) for q, rows in zip(q1, reductions)]), upper=True
    )
    qs = [torch.linalg.solve_triangular(r2[i], q, upper=True, left=False) for i, q in enumerate(q1)]
    r = r2 @ r1
    diag = torch.diagonal(r1, dim1=-2, dim2=-1) / norms
    spread = diag.amax(-1) / diag.amin(-1)
    limit = _CHOLESKY_QR_MAX_SPREAD.get(grams.dtype, 1e3)
    bad = (info1 != 0) | (info2 != 0) | ~(spread <= limit) | ~torch.isfinite(r).flatten(-2).all(-1)
    results = [(q, r[i], grams[i]) for i, q in enumerate(qs)]
    if not settle:
        return results, bad
    return settle_panels(panels, reductions, results, bad), None


def settle_panels(
    panels: list[torch.Tensor],
    reductions: list[RowReduction],
    results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    bad: torch.Tensor,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The CholeskyQR2 `results` with the panels flagged in `bad` refactored by Householder QR.

    Reads the flags on the host (one read; the decision is identical on every rank), and returns `results` itself
    when none is flagged.
    """
    if not bool(bad.any()):
        return results
    return [
        householder_where(panel, rows, *result, bad[i]) if bool(bad[i].any()) else result
        for i, (panel, rows, result) in enumerate(zip(panels, reductions, results))
    ]


def householder_where(
    panel: torch.Tensor, rows: RowReduction, q: torch.Tensor, r: torch.Tensor, gram: torch.Tensor, bad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, R, Gram) with the panels flagged in `bad` refactored by Householder QR of their gathered rows.

    CholeskyQR2's fallback (:func:`settle_panels` calls it); the all-gather it issues is CholeskyQR2's
    communication, as benchmarks/fsdp2_communication.py books it.
    """
    batch_shape = q.shape[:-2]
    q, r = q.reshape(-1, *q.shape[-2:]), r.reshape(-1, *r.shape[-2:])
    which = bad.reshape(-1).nonzero().squeeze(1)  # gather only the ill-conditioned panels
    q_full, r_full = torch.linalg.qr(rows.gather(panel.reshape(-1, *panel.shape[-2:])[which]))
    q = q.index_copy(0, which, rows.mine(q_full)).reshape(*batch_shape, *q.shape[-2:])
    r = r.index_copy(0, which, r_full).reshape(*batch_shape, *r.shape[-2:])
    return q, r, gram


def factor_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the factor math: float32 for 16/32-bit parameters, float64 stays float64."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def effective_rank(rank: int, shape: torch.Size) -> int:
    """The rank kept for an m x n matrix (or each matrix of an E x m x n stack of experts): min(rank, m, n)."""
    return min(rank, shape[-2], shape[-1])


# Devices where G^T U is formed as (U^T G)^T: on CPU BLAS the transposed-left product of a wide m x n matrix by a
# thin m x r one takes a slow path (fp32, r = 8: 4.7x-13x slower on 4096 x 4096 .. 14336 x 4096, measured with
# python -m benchmarks.optimizer_step --projection-forms); CUDA's GEMM takes transposes as flags, so it keeps G^T U.
_TRANSPOSE_OUTSIDE = {"cpu"}


def transpose_times(tall: torch.Tensor, thin: torch.Tensor) -> torch.Tensor:
    """A^T B for A (k x m) and a thin B (k x r), in the form that is fast on A's device (same numbers up to rounding).

    Used for G^T U (A = G; batched over experts) and for the projected Linear backward's dY^T (X V) and X^T (dY U)
    (A = dY or X).
    """
    return (thin.mT @ tall).mT if tall.device.type in _TRANSPOSE_OUTSIDE else tall.mT @ thin


def project_gradient(grad: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (G V, G^T U) in the factors' dtype (for an E x m x n stack of experts, E x m x r and E x n x r).

    A low-precision gradient is multiplied in its own dtype (the matmul accumulates in fp32 on current
    hardware) so that no m x n upcast copy is ever made; only the m x r and n x r results are upcast.
    """
    if grad.dtype == U.dtype:
        return grad @ V, transpose_times(grad, U)
    gv = (grad @ V.to(grad.dtype)).to(U.dtype)
    return gv, transpose_times(grad, U.to(grad.dtype)).to(U.dtype)


def add_projections_(
    gv: torch.Tensor, gtu: torch.Tensor, grad: torch.Tensor, U: torch.Tensor, V: torch.Tensor
) -> None:
    """Add G V to `gv` and G^T U to `gtu` in place (the next micro-batch of an accumulation).

    G V is one fused multiply-add when G has the factors' dtype; G^T U keeps :func:`project_gradient`'s form (an
    in-place product into a transposed output takes CPU BLAS's slow path).
    """
    if grad.dtype == gv.dtype:
        (gv.addmm_ if grad.dim() == 2 else gv.baddbmm_)(grad, V)
        gtu.add_(transpose_times(grad, U))
        return
    more_gv, more_gtu = project_gradient(grad, U, V)
    gv.add_(more_gv)
    gtu.add_(more_gtu)


def tangent_norm_sq(U: torch.Tensor, gv: torch.Tensor, gtu: torch.Tensor) -> torch.Tensor:
    """||G_hat||_F^2 of the tangent projection G_hat = UU^T G + G VV^T - UU^T G VV^T, from projections only.

    With orthonormal U, V the three terms give ||U^T G||^2 + ||G V||^2 - ||U^T G V||^2 (one value per batch entry).
    """
    utgv = U.mT @ gv
    return gtu.square().sum((-2, -1)) + gv.square().sum((-2, -1)) - utgv.square().sum((-2, -1))


def _as_scale(beta: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """Return beta as a scalar, or a per-batch tensor shaped to broadcast against `like` (... x r)."""
    return (
        beta
        if not torch.is_tensor(beta)
        else beta.to(like.dtype).reshape(*beta.shape, *([1] * (like.dim() - beta.dim())))
    )


def _cholesky_qr_suits(basis: torch.Tensor) -> bool:
    """Whether the panel [basis | projection] (2r columns) goes through CholeskyQR2 on this device: it must be tall."""
    return basis.device.type in CHOLESKY_QR_DEVICES and basis.shape[-2] >= 2 * basis.shape[-1]


class UnsettledPanels(NamedTuple):
    """CholeskyQR2 results whose fallback flags (panel x batch entry) are still to be read (:func:`settle_panels`)."""

    panels: list[torch.Tensor]
    reductions: list[RowReduction]
    results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    bad: torch.Tensor


class PanelFactors(NamedTuple):
    """Thin QRs [U | GV] = Q_U R_U and [V | G^T U] = Q_V R_V, and U^T G V, of a batch of matrices.

    ``unsettled``: the panels CholeskyQR2 factored, whose fallback check is still to be read
    (:func:`settle_panel_factors`); None when every panel is final.
    """

    q_u: torch.Tensor
    r_u: torch.Tensor
    utgv: torch.Tensor
    q_v: torch.Tensor
    r_v: torch.Tensor
    unsettled: UnsettledPanels | None = None

    def unsettled_entries(self) -> torch.Tensor | None:
        """Per batch entry, whether one of its panels awaits the fallback (a device tensor: no host read)."""
        return None if self.unsettled is None else self.unsettled.bad.any(0)


def panel_factors(
    U: torch.Tensor,
    V: torch.Tensor,
    gv: torch.Tensor,
    gtu: torch.Tensor,
    rows: RowReduction | None = None,
) -> PanelFactors:
    """Orthonormalise [U | GV] and [V | G^T U] (batched over leading dims), leaving CholeskyQR2's check unread.

    With `rows` (FSDP2), U, GV and Q_U hold this rank's rows only: [U | GV] goes through CholeskyQR2, whose Gram
    also gives U^T G V; V and G^T U are replicated. On the devices in CHOLESKY_QR_DEVICES both tall panels go
    through CholeskyQR2. Panels CholeskyQR2 factored may still need its fallback: see ``unsettled``. A sharded
    [U | GV] with fewer rows than columns is gathered instead (:func:`_wide_sharded_panel_factors`).
    """
    r = U.shape[-1]
    panel_u, panel_v = torch.cat([U, gv], dim=-1), torch.cat([V, gtu], dim=-1)
    if rows is not None and rows.total(U) < 2 * r:
        return _wide_sharded_panel_factors(panel_u, panel_v, r, rows)
    cholesky_u = rows is not None or _cholesky_qr_suits(U)  # sharded rows: only CholeskyQR2 reduces them
    if cholesky_u and _cholesky_qr_suits(V):  # both panels' Cholesky passes batched together
        # V, G^T U are replicated on every rank: their panel needs no reduction
        panels, reductions = [panel_u, panel_v], [rows or LOCAL_ROWS, LOCAL_ROWS]
        results, bad = cholesky_qr2_panels(panels, reductions, settle=False)
        (q_u, r_u, gram), (q_v, r_v, _) = results
    elif cholesky_u:  # here V's panel is wide, or its device keeps Householder
        panels, reductions = [panel_u], [rows or LOCAL_ROWS]
        results, bad = cholesky_qr2_panels(panels, reductions, settle=False)
        (q_u, r_u, gram), (q_v, r_v) = results[0], torch.linalg.qr(panel_v)
    else:
        (q_u, r_u), (q_v, r_v), gram, bad = torch.linalg.qr(panel_u), torch.linalg.qr(panel_v), None, None
    utgv = U.mT @ gv if gram is None else gram[..., :r, r:]
    unsettled = None if bad is None else UnsettledPanels(panels, reductions, results, bad)
    return PanelFactors(q_u, r_u, utgv, q_v, r_v, unsettled)


def _wide_sharded_panel_factors(
    panel_u: torch.Tensor, panel_v: torch.Tensor, r: int, rows: RowReduction
) -> PanelFactors:
    """:func:`panel_factors` of a row-sharded [U | GV] with fewer rows m than its 2r columns (a router, a small head).

    Such a panel's Gram is singular, so CholeskyQR2 cannot factor it: it is all-gathered (m 2r numbers, m < 2r) and
    factored by Householder QR, as one process does: Q_U is m x m (this rank keeps its rows of it), R_U m x 2r.
    Every rank factors the same gathered panel, so the replicated results are the same bits on every rank.
    """
    whole = rows.gather(panel_u)
    q_u, r_u = torch.linalg.qr(whole)
    q_v, r_v = torch.linalg.qr(panel_v)
    return PanelFactors(rows.mine(q_u), r_u, whole[..., :r].mT @ whole[..., r:], q_v, r_v)


def settle_panel_factors(factors: PanelFactors) -> PanelFactors:
    """`factors` with CholeskyQR2's fallback applied where it was needed (reads the flags on the host).

    Returns `factors` itself when no panel needed it.
    """
    if factors.unsettled is None:
        return factors
    settled = settle_panels(*factors.unsettled)
    if settled is factors.unsettled.results:
        return factors
    (q_u, r_u, _) = settled[0]
    q_v, r_v = (settled[1][0], settled[1][1]) if len(settled) == 2 else (factors.q_v, factors.r_v)
    return PanelFactors(q_u, r_u, factors.utgv, q_v, r_v)


def settle_panel_factors_on_device(factors: PanelFactors) -> PanelFactors:
    """`factors` with CholeskyQR2's fallback selected on the device: no host read, at the cost of a Householder QR.

    Every panel CholeskyQR2 factored is also factored by Householder QR, and each batch entry keeps the Householder
    result where its flag is set (``torch.where``), so the op sequence does not depend on the data. Panels whose
    rows are spread over ranks are not supported here (their Householder QR needs an all-gather).
    """
    if factors.unsettled is None:
        return factors
    panels, reductions, results, bad = factors.unsettled
    if any(rows is not LOCAL_ROWS for rows in reductions):
        raise ValueError("the sync-free panel fallback needs unsharded panels (FSDP2 rows are gathered on the host)")
    settled = []
    for panel, (q, r, _), flags in zip(panels, results, bad):
        q_h, r_h = torch.linalg.qr(panel)
        where = flags[..., None, None]
        settled.append((torch.where(where, q_h, q), torch.where(where, r_h, r)))
    q_v, r_v = settled[1] if len(settled) == 2 else (factors.q_v, factors.r_v)
    return PanelFactors(settled[0][0], settled[0][1], factors.utgv, q_v, r_v)


def core_of(factors: PanelFactors, S: torch.Tensor, beta: float | torch.Tensor) -> MomentumCore:
    """The core K of beta U diag(S) V^T + G_hat = Q_U K Q_V^T, from the panels' QRs (batched over leading dims).

    The middle block C = [[beta diag(S) - U^T G V, I], [I, 0]] makes [U | GV] C [V | G^T U]^T
    = beta U S V^T + U U^T G + G V V^T - U U^T G V V^T exactly, so K = R_U C R_V^T. `beta` is a number or one
    value per batch entry.
    """
    r = S.shape[-1]
    # R_U C R_V^T by blocks (R_1 = first r columns, R_2 = the rest), without forming C
    ru1, ru2, rv1, rv2 = factors.r_u[..., :r], factors.r_u[..., r:], factors.r_v[..., :r], factors.r_v[..., r:]
    rv1_t = rv1.mT
    grad_core = ru1 @ (rv2.mT - factors.utgv @ rv1_t) + ru2 @ rv1_t
    momentum_part = (ru1 * (_as_scale(beta, S) * S).unsqueeze(-2)) @ rv1_t
    return MomentumCore(factors.q_u, factors.q_v, grad_core + momentum_part, grad_core)


def momentum_step(
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    gv: torch.Tensor,
    gtu: torch.Tensor,
    beta: float | torch.Tensor,
    rank: int,
    nesterov: bool = False,
    rows: RowReduction | None = None,
    sync_free: bool = False,
) -> tuple[LowRank, LowRank]:
    """The new momentum factors SVD_r(beta M + G_hat) and the step's direction (the Nesterov look-ahead or them).

    CholeskyQR2's fallback flags are read only after the core's SVD: on CUDA torch's batched SVD waits for the
    device anyway (it checks convergence on the host), so the read adds no wait of its own. Entries that need the
    fallback enter that SVD with a zero core, and are redone after it (rare: a zero or rank-deficient gradient).

    ``sync_free``: nothing is read on the host (:func:`sync_free_momentum_stages`, with its cores factored here).
    """
    if sync_free:
        return run_core_svds([sync_free_momentum_stages(U, S, V, gv, gtu, beta, rank, nesterov, rows)])[0]
    factors = panel_factors(U, V, gv, gtu, rows)
    unsettled = factors.unsettled_entries()
    core = core_of(factors, S, beta)
    if unsettled is not None:  # a failed Cholesky may leave non-finite numbers, which the SVD must not see
        core = core._replace(core=core.core.masked_fill(unsettled[..., None, None], 0))
    new = truncate(core.q_u, core.q_v, core.core, rank)
    settled = settle_panel_factors(factors)  # reads the flags: the device is idle here, the SVD waited for it
    if settled is not factors:
        core = core_of(settled, S, beta)
        new = truncate(core.q_u, core.q_v, core.core, rank)
    return new, nesterov_direction(core, new, beta, rank, rows) if nesterov else new


Svd = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# A computation that yields each small core it needs factored, receives its (U, S, Vh), and returns a result.
CoreStages = Generator[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], Any]


def sync_free_momentum_stages(
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    gv: torch.Tensor,
    gtu: torch.Tensor,
    beta: float | torch.Tensor,
    rank: int,
    nesterov: bool = False,
    rows: RowReduction | None = None,
) -> CoreStages:
    """:func:`momentum_step` with nothing read on the host, as stages that yield their 2r x 2r cores.

    The panel fallback is decided on the device (:func:`settle_panel_factors_on_device`); the cores are yielded,
    so that :func:`run_core_svds` factors the cores of every bucket of a step in one sync-free batched SVD (the
    core is 2r x 2r whatever the matrix shape). Returns (new factors, direction).
    """
    factors = settle_panel_factors_on_device(panel_factors(U, V, gv, gtu, rows))
    core = core_of(factors, S, beta)
    new = _truncated(core.q_u, core.q_v, (yield core.core), rank)
    if not nesterov:
        return new, new
    lookahead = _lookahead(core, new, beta, rows)
    return new, _truncated(core.q_u, core.q_v, (yield lookahead), rank)


def run_core_svds(stages: list[CoreStages], svd: Svd | None = None) -> list[Any]:
    """Drive computations in lockstep, factoring the cores they yield together: one SVD per (shape, dtype, device).

    `svd` defaults to :func:`mofasgd.jacobi_svd.jacobi_svd` (sync-free). Returns each computation's result.
    """
    svd = jacobi_svd if svd is None else svd
    results: list[Any] = [None] * len(stages)
    waiting: dict[int, torch.Tensor] = {}
    for i, stage in enumerate(stages):
        try:
            waiting[i] = next(stage)
        except StopIteration as done:
            results[i] = done.value
    while waiting:
        groups: dict[tuple, list[int]] = {}
        for i, core in waiting.items():
            groups.setdefault((tuple(core.shape[-2:]), core.dtype, core.device), []).append(i)
        answers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for members in groups.values():
            cores = [waiting[i] for i in members]
            batch = [core.shape[:-2].numel() for core in cores]
            u, s, vh = svd(torch.cat([core.reshape(-1, *core.shape[-2:]) for core in cores]))
            pieces = zip(*(t.split(batch) for t in (u, s, vh)))
            for i, core, (pu, ps, pvh) in zip(members, cores, pieces):
                lead = core.shape[:-2]
                answers[i] = (
                    pu.reshape(*lead, *pu.shape[1:]),
                    ps.reshape(*lead, -1),
                    pvh.reshape(*lead, *pvh.shape[1:]),
                )
        waiting = {}
        for i, answer in answers.items():
            try:
                waiting[i] = stages[i].send(answer)
            except StopIteration as done:
                results[i] = done.value
    return results


def _lapack_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(matrix, full_matrices=False)


def _truncated(
    q_u: torch.Tensor, q_v: torch.Tensor, svd_of_core: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int
) -> LowRank:
    """The top-`rank` factors of Q_U core Q_V^T from the core's SVD (a, s, b^T)."""
    a, s, bt = svd_of_core
    return LowRank(q_u @ a[..., :rank], s[..., :rank].clone(), q_v @ bt[..., :rank, :].mT)


def truncate(q_u: torch.Tensor, q_v: torch.Tensor, core: torch.Tensor, rank: int) -> LowRank:
    """Best rank-`rank` approximation of Q_U core Q_V^T (Eckart-Young), via the SVD of the small core."""
    return _truncated(q_u, q_v, _lapack_svd(core), rank)


def _lookahead(
    core: MomentumCore, new: LowRank, beta: float | torch.Tensor, rows: RowReduction | None
) -> torch.Tensor:
    """The core of beta M_new + G_hat in the bases Q_U, Q_V, where both terms live."""
    a = core.q_u.mT @ new.U if rows is None else rows.sum(core.q_u.mT @ new.U)
    b = core.q_v.mT @ new.V
    return (a * (_as_scale(beta, new.S) * new.S).unsqueeze(-2)) @ b.mT + core.grad_core


def nesterov_direction(
    core: MomentumCore, new: LowRank, beta: float | torch.Tensor, rank: int, rows: RowReduction | None = None
) -> LowRank:
    """SVD_r(beta M_new + G_hat), formed inside span(Q_U) x span(Q_V) where both terms live."""
    return truncate(core.q_u, core.q_v, _lookahead(core, new, beta, rows), rank)


def step_scaling(S: torch.Tensor, eps: float, max_value: float, use_ones: bool) -> torch.Tensor:
    """Per-direction scale s_hat: 1 (spectral form) or min(1/S, max_value), and 0 where S <= eps."""
    alive = S > eps
    if use_ones:
        return alive.to(S.dtype)
    return torch.where(alive, S.reciprocal().clamp_max_(max_value), 0.0)  # 1/0 = inf is clamped, then dropped


def gradient_support(S: torch.Tensor, tangent_sq: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """Per direction, ||G_hat|| / ((1 - beta) S_i): how much of the momentum this step's gradient sustains.

    1 for the strongest direction in the steady state of a constant gradient (S = ||G|| / (1 - beta)), far above
    1 for noisy gradients, and 0 when the gradient has vanished and S only decays by beta per step. `S` is B x r,
    `tangent_sq` (||G_hat||^2) B, `beta` a float or B values.
    """
    one_minus = 1.0 - (beta.unsqueeze(-1) if torch.is_tensor(beta) else beta)
    return tangent_sq.clamp_min(0).sqrt().unsqueeze(-1) / (one_minus * S).clamp_min(torch.finfo(S.dtype).tiny)


def support_throttle(support: torch.Tensor, floor: float) -> torch.Tensor:
    """The guard's factor on the 1/S scale: 1 where the support is at least `floor`, support / floor below it."""
    return (support / floor).clamp_max_(1.0)


def top_singular_triplets(matrix: torch.Tensor, rank: int) -> LowRank:
    """Exact top-`rank` SVD of a matrix (or of each of a stack) through the economy SVD (never the full one)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return LowRank(u[..., :rank].contiguous(), s[..., :rank].clone(), vh[..., :rank, :].mT.contiguous())


def randomized_top_singular_triplets(
    matrix: torch.Tensor,
    rank: int,
    dtype: torch.dtype,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
    average: Callable[[list[torch.Tensor]], None] | None = None,
) -> LowRank:
    """Approximate top-`rank` SVD of `matrix` in `dtype`: orthonormal U (m x rank), V (n x rank) and S.

    Randomized range finder with power iterations (Halko, Martinsson & Tropp 2011); costs a few products with
    `matrix` and temporaries of O((m + n)(rank + oversample)), instead of the economy SVD's O(m n min(m, n)).
    Its own generator keeps the global RNG stream untouched; the same matrix and seed give the same result. A stack
    of E x m x n expert matrices is factored expert by expert with the same probe (so like E separate matrices).

    `average` (data parallelism: average a list of tensors over ranks in place) is applied to every product with
    `matrix`. Each product is linear in `matrix` and the bases it meets are equal on every rank (same seed, same
    averaged inputs), so the ranks compute the factors of their mean matrix, exchanging thin sketches only.
    """
    m, n = matrix.shape[-2:]
    width = min(rank + oversample, m, n)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    probe = torch.randn(n, width, generator=generator, device=matrix.device, dtype=dtype).to(matrix.dtype)

    def times(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        product = (left @ right.to(matrix.dtype)).to(dtype)
        if average is not None:
            product = product.contiguous()
            average([product])
        return product

    basis = torch.linalg.qr(times(matrix, probe))[0]
    for _ in range(power_iters):
        co_basis = torch.linalg.qr(times(matrix.mT, basis))[0]
        basis = torch.linalg.qr(times(matrix, co_basis))[0]
    small = times(matrix.mT, basis).mT
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    return LowRank(
        (basis @ u_small[..., :rank]).contiguous(), s[..., :rank].clone(), vh[..., :rank, :].mT.contiguous()
    )
