"""torch.optim.AdamW's update for low-precision parameters, computed in fp32 and stored with stochastic rounding.

torch's AdamW on a bf16 parameter does its arithmetic in bf16, so updates below half an ulp vanish and the
bf16 moments stop decaying (0.999 * v rounds back to v). Here each chunk of the parameter and of its moments
is loaded into fp32, updated with the same formulas as torch's single-tensor AdamW, and written back (rounded
stochastically when a generator is given). The moments keep the parameter's dtype, as in torch.
"""

from __future__ import annotations

import math

import torch

from mofasgd.rounding import as_rows, store_, update_in_fp32_


def adamw_update_fp32_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    generator: torch.Generator | None,
) -> None:
    """One AdamW step (decoupled weight decay, bias correction; `step` counts this one) in fp32 chunks."""
    step_size = lr / (1.0 - beta1**step)
    bias2_sqrt = math.sqrt(1.0 - beta2**step)
    grads, avgs, avg_sqs = as_rows(grad), as_rows(exp_avg), as_rows(exp_avg_sq)

    def compute(buffer: torch.Tensor, start: int, stop: int, noise: torch.Tensor | None) -> None:
        g = grads[start:stop].float()
        m = avgs[start:stop].float().lerp_(g, 1.0 - beta1)
        v = avg_sqs[start:stop].float().mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if weight_decay != 0:
            buffer.mul_(1.0 - lr * weight_decay)
        buffer.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-step_size)
        store_(avgs[start:stop], m, generator, noise)
        store_(avg_sqs[start:stop], v, generator, noise)

    update_in_fp32_(param, compute, generator)
