"""The functional core of a MoFaSGD step: one bucket's math as a function of stacked tensors, and one weight update.

:func:`bucket_direction` takes a bucket's stacked factors and pending projections (B matrices of one shape) and
returns the new factors, the step's direction and scale and the finiteness mask, without touching its inputs or
reading anything on the host (with ``sync_free``). :func:`update_matrix_` applies one matrix's update in place,
with rounding as its one seam (:func:`mofasgd.rounding.update_in_place_`). The optimizer class gathers the buckets,
owns the state and calls these two (torch.optim's functional-core pattern).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mofasgd import factor_math as fm
from mofasgd.fused_rounding import low_rank_update_
from mofasgd.rounding import update_in_place_


class DirectionSettings(NamedTuple):
    """The hyper-parameters of a bucket's factor math that fix its op sequence (plain Python values)."""

    rank: int
    nesterov: bool
    eps: float
    max_value: float
    use_ones_for_nonzero_s: bool
    min_gradient_support: float
    want_support: bool  # compute the gradient support (the guard, or diagnostics) where the 1/S form applies
    sync_free: bool  # no host reads: device-side panel fallback, Jacobi core SVD


class BucketOutcome(NamedTuple):
    """What one bucket's math produced: per matrix of the bucket (B entries)."""

    factors: fm.LowRank  # the new momentum factors; a skipped matrix keeps its old ones
    direction: fm.LowRank  # the step's direction (the Nesterov look-ahead, or the new factors)
    scale: torch.Tensor  # B x r: s_hat per direction, 0 for a skipped matrix
    finite: torch.Tensor  # B: whether the matrix's projections were finite (and the step allowed)
    support: torch.Tensor | None  # B x r: gradient support per direction, when computed


# Devices where reading a small flag on the host costs no wait (no asynchronous queue to drain).
_FREE_HOST_READS = {"cpu"}


def finite_entries(gv: torch.Tensor, gtu: torch.Tensor, rows: fm.RowReduction | None = None) -> torch.Tensor:
    """Per matrix, whether its projections are finite (any inf or nan, or a sum past the float range, fails)."""
    finite = torch.isfinite(gv.sum((-2, -1)) + gtu.sum((-2, -1)))
    if rows is not None:  # a shard's non-finite rows skip the matrix on every rank
        finite = rows.sum((~finite).to(gv.dtype)) == 0
    return finite


class BucketInputs(NamedTuple):
    """One bucket's stacked tensors and step values, as :func:`bucket_direction` takes them."""

    U: torch.Tensor  # B x m x r
    S: torch.Tensor  # B x r
    V: torch.Tensor  # B x n x r
    gv: torch.Tensor  # B x m x r
    gtu: torch.Tensor  # B x n x r
    beta: float | torch.Tensor  # a number, or B values
    settings: DirectionSettings
    rows: fm.RowReduction | None = None  # FSDP2: how row-sharded U and G V meet across ranks
    allowed: torch.Tensor | None = None  # a device flag: false skips every matrix of the step


def bucket_direction(inputs: BucketInputs) -> BucketOutcome:
    """One bucket's MoFaSGD math: SVD_r(beta M + G_hat), the direction and its per-direction scale.

    A matrix whose projections are not finite (or every matrix, when the device flag `allowed` is false) keeps its
    factors and gets a zero scale, decided on the device. Its inputs are not modified.
    """
    return bucket_directions([inputs])[0]


def bucket_directions(buckets: list[BucketInputs]) -> list[BucketOutcome]:
    """:func:`bucket_direction` of several buckets; sync-free ones share one batched core SVD per core shape."""
    stages = [_direction_stages(inputs) for inputs in buckets]
    return fm.run_core_svds(stages) if stages and buckets[0].settings.sync_free else [_finish(s) for s in stages]


def _finish(stages: fm.CoreStages) -> BucketOutcome:
    try:
        next(stages)
    except StopIteration as done:
        return done.value
    raise AssertionError("an eager bucket step factors its cores itself")


def _direction_stages(inputs: BucketInputs) -> fm.CoreStages:
    """The bucket's math as stages: a sync-free step yields its cores (fm.run_core_svds), an eager one none."""
    U, S, V, gv, gtu, beta, settings, rows, allowed = inputs
    finite = finite_entries(gv, gtu, rows)
    if allowed is not None:
        finite = finite & allowed
    # where reading the flags costs nothing (the CPU), an all-finite bucket (the usual case) skips the masking copies
    masked = settings.sync_free or finite.device.type not in _FREE_HOST_READS or not bool(finite.all())
    if masked:
        skip = (~finite)[:, None, None]
        gv, gtu = gv.masked_fill(skip, 0), gtu.masked_fill(skip, 0)
    if settings.sync_free:
        stages = fm.sync_free_momentum_stages(U, S, V, gv, gtu, beta, settings.rank, settings.nesterov, rows)
        new, direction = yield from stages
    else:
        new, direction = fm.momentum_step(U, S, V, gv, gtu, beta, settings.rank, settings.nesterov, rows)
    scale = fm.step_scaling(direction.S, settings.eps, settings.max_value, settings.use_ones_for_nonzero_s)
    if masked:
        keep = finite[:, None, None]
        new = fm.LowRank(
            torch.where(keep, new.U, U), torch.where(finite[:, None], new.S, S), torch.where(keep, new.V, V)
        )
        scale = scale * finite[:, None]
    support = None
    if rows is None and settings.want_support and not settings.use_ones_for_nonzero_s:
        support = fm.gradient_support(direction.S, fm.tangent_norm_sq(U, gv, gtu), beta)
        if settings.min_gradient_support > 0:  # the opt-in guard: a 1/S step no larger than the gradient sustains
            scale = scale * fm.support_throttle(support, settings.min_gradient_support)
    return BucketOutcome(new, direction, scale, finite, support)


def update_matrix_(
    param: torch.Tensor,
    left: torch.Tensor,
    right_t: torch.Tensor,
    alpha: float | torch.Tensor,
    decay: torch.Tensor | None = None,
    complement: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    compiled: bool = False,
) -> None:
    """W <- decay W + alpha left right_t [+ beta2 (I - UU^T) G (I - VV^T)], in place, in W's rows.

    `left` (m x k) and `right_t` (k x n) come in the arithmetic's dtype: fp32 when `generator` rounds the result
    stochastically into a bf16 W, else W's own. `complement` = (G, U, V, alpha2) adds eta2's step, formed as
    G - U (G^T U)^T - (G V - U U^T G V) V^T (no m x m or n x n). `decay` is a device scalar (no host read).
    `compiled` takes the rounded update without a complement through the fused kernel
    (:func:`mofasgd.fused_rounding.low_rank_update_`: one pass, hashed bits).
    """
    if compiled and generator is not None and complement is None:
        low_rank_update_(param, left, right_t, alpha, decay, generator)
        return
    if complement is not None:
        grad, basis_u, basis_v, alpha2 = complement
        gv, gtu = fm.project_gradient(grad, basis_u, basis_v)  # in the factors' dtype
        residual = (gv - basis_u @ (basis_u.T @ gv)).to(left.dtype)
        gtu_t, basis_u, basis_v_t = gtu.T.to(left.dtype), basis_u.to(left.dtype), basis_v.T.to(left.dtype)

    def compute(buffer: torch.Tensor, start: int, stop: int, noise: torch.Tensor | None) -> None:
        def rows(tensor: torch.Tensor) -> torch.Tensor:  # the whole tensor needs no slicing op
            return tensor if start == 0 and stop == tensor.shape[0] else tensor[start:stop]

        if decay is not None:
            buffer.mul_(decay)
        _addmm_(buffer, rows(left), right_t, alpha)
        if complement is not None:
            _add_(buffer, rows(grad).to(buffer.dtype), alpha2)
            _addmm_(buffer, rows(basis_u), gtu_t, -alpha2)
            _addmm_(buffer, rows(residual), basis_v_t, -alpha2)

    update_in_place_(param, compute, generator)


def _addmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float | torch.Tensor) -> None:
    """Add alpha a b to `out`, for a number alpha (one fused op) or a device scalar (scaled first, no host read)."""
    if torch.is_tensor(alpha):
        out.addmm_(a * alpha.to(a.dtype), b)
    else:
        out.addmm_(a, b, alpha=alpha)


def _add_(out: torch.Tensor, a: torch.Tensor, alpha: float | torch.Tensor) -> None:
    """Add alpha a to `out`, for a number or a device scalar alpha."""
    if torch.is_tensor(alpha):
        out.add_(a * alpha.to(a.dtype))
    else:
        out.add_(a, alpha=alpha)
