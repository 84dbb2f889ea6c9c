"""The AdamW side's updates: torch.optim.AdamW's for low-precision parameters in fp32 chunks, and a compact variant.

`adamw_update_fp32_`: torch.optim.AdamW's update for low-precision parameters, computed in fp32 and stored with
stochastic rounding. `factored_adam_update_`: the same step with Adafactor's factored second moment, O(m + n)
state instead of m n, for the large AdamW-side matrices (embeddings, LM head).

torch's AdamW on a bf16 parameter does its arithmetic in bf16, so updates below half an ulp vanish and the
bf16 moments stop decaying (0.999 * v rounds back to v). Here each chunk of the parameter and of its moments
is loaded into fp32, updated with the same formulas as torch's single-tensor AdamW, and written back (rounded
stochastically when a generator is given). The moments keep the parameter's dtype, as in torch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from mofasgd.rounding import as_rows, row_chunks, store_, update_in_fp32_

_TINY = 1e-30  # added to g^2 so that an all-zero row or column keeps a positive second moment (Adafactor's eps1)


class AdamSettings(NamedTuple):
    """The AdamW hyper-parameters one update uses."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def of(cls, group: dict[str, Any]) -> AdamSettings:
        """Read them from a MoFaSGD param group (`lr`, `adam_betas`, `adam_eps`, `weight_decay`)."""
        return cls(group["lr"], *group["adam_betas"], group["adam_eps"], group["weight_decay"])


def adamw_update_fp32_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int | torch.Tensor,
    settings: AdamSettings,
    generator: torch.Generator | None,
    allowed: torch.Tensor | None = None,
) -> None:
    """One AdamW step (decoupled weight decay, bias correction; `step` counts this one) in fp32 chunks.

    With a device flag `allowed` (the capturable step: `step` a device tensor, nothing read on the host) the
    update is masked on the device: where it is false, the parameter and both moments keep their values.
    """
    lr, beta1, beta2, eps, weight_decay = settings
    grads, avgs, avg_sqs = as_rows(grad), as_rows(exp_avg), as_rows(exp_avg_sq)
    if allowed is None:
        step_size, bias2_sqrt, keep_m, keep_v, decay = lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step), 0, 0, 0
    else:  # the same numbers as device tensors; 1 - (1 - beta) * ok keeps a moment unchanged where ok is 0
        ok = allowed.to(torch.float32)
        step = step.to(torch.float32)
        step_size = ok * lr / (1.0 - beta1**step)
        bias2_sqrt = (1.0 - beta2**step).sqrt()
        keep_m, keep_v, decay = (1.0 - beta1) * ok, (1.0 - beta2) * ok, 1.0 - lr * weight_decay * ok

    def compute(buffer: torch.Tensor, start: int, stop: int, noise: torch.Tensor | None) -> None:
        g = grads[start:stop].float()
        if allowed is None:
            m = avgs[start:stop].float().lerp_(g, 1.0 - beta1)
            v = avg_sqs[start:stop].float().mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            if weight_decay != 0:
                buffer.mul_(1.0 - lr * weight_decay)
            buffer.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-step_size)
        else:
            g = torch.where(allowed, g, 0.0)  # a skipped step's gradient may be non-finite: 0 * inf is nan
            m = avgs[start:stop].float().lerp_(g, keep_m)
            v = avg_sqs[start:stop].float()
            v.add_((g.square_() - v).mul_(keep_v))
            if weight_decay != 0:
                buffer.mul_(decay)
            buffer.sub_(m / (v.sqrt() / bias2_sqrt).add_(eps) * step_size)
        store_(avgs[start:stop], m, generator, noise)
        store_(avg_sqs[start:stop], v, generator, noise)

    update_in_fp32_(param, compute, generator)


def factored_adam_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    row_sq: torch.Tensor,
    col_sq: torch.Tensor,
    step: int,
    settings: AdamSettings,
    generator: torch.Generator | None,
) -> None:
    """AdamW with a factored second moment (Adafactor's, Shazeer & Stern 2018) for an m x n matrix, in fp32 chunks.

    Instead of v (m x n) it keeps fp32 running means of g^2 over each row (`row_sq`, m) and column (`col_sq`, n)
    and uses v_ij ~ row_i col_j / mean(row), the rank-1 estimate that is exact when v is rank 1. The first
    moment is AdamW's (param dtype, rounded like the parameter), or absent (`exp_avg` None: the step uses g).
    Decoupled weight decay and bias corrections as in AdamW. Two passes over the gradient: the row and column
    means, then the update.
    """
    lr, beta1, beta2, eps, weight_decay = settings
    grads = as_rows(grad)
    col_sum = torch.zeros_like(col_sq)
    for start, stop in row_chunks(*grads.shape):
        g_sq = grads[start:stop].float().square().add_(_TINY)  # not square_: .float() of fp32 is the grad itself
        row_sq[start:stop].mul_(beta2).add_(g_sq.mean(dim=1), alpha=1.0 - beta2)
        col_sum.add_(g_sq.sum(dim=0))
    col_sq.mul_(beta2).add_(col_sum, alpha=(1.0 - beta2) / grads.shape[0])
    row_scale = 1.0 / ((1.0 - beta2**step) * float(row_sq.mean().clamp_min(_TINY)))  # one host read per matrix
    step_size = lr / (1.0 - beta1**step) if exp_avg is not None else lr
    avgs = as_rows(exp_avg) if exp_avg is not None else None

    def compute(buffer: torch.Tensor, start: int, stop: int, noise: torch.Tensor | None) -> None:
        g = grads[start:stop].float()
        direction = g if avgs is None else avgs[start:stop].float().lerp_(g, 1.0 - beta1)
        denom = torch.outer(row_sq[start:stop] * row_scale, col_sq).sqrt_().add_(eps)
        if weight_decay != 0:
            buffer.mul_(1.0 - lr * weight_decay)
        buffer.addcdiv_(direction, denom, value=-step_size)
        if avgs is not None:  # after its use: rounding consumes the fp32 value (as in adamw_update_fp32_)
            store_(avgs[start:stop], direction, generator, noise)

    update_in_fp32_(param, compute, generator)
