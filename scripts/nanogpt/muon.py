"""Muon: SGD momentum whose update is orthogonalised by a Newton–Schulz iteration (Jordan et al., 2024).

For a weight matrix W (m x n) with gradient G::

    B  <- mu B + G                                   (momentum buffer)
    D  <- G + mu B if nesterov else B
    O  <- NewtonSchulz(D) ~ U V^T of the SVD D = U S V^T
    W  <- W (1 - lr wd) - lr sqrt(max(1, m / n)) O

Use it for the hidden matrices of a network only. Embeddings, the LM head, norm gains and biases
should be trained with Adam(W) in a separate optimizer::

    hidden = [p for name, p in model.blocks.named_parameters() if p.ndim == 2]
    Muon(hidden, lr=0.05, momentum=0.95)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# Coefficients of the quintic x -> a x + b x^3 + c x^5 published with Muon: they push every singular
# value of a normalised matrix into roughly [0.7, 1.2] within five iterations, which is what Muon needs.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_GROUP_KEYS = {"params", "lr", "momentum", "nesterov", "ns_steps", "weight_decay"}


def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal factor U V^T of `matrix` with `steps` quintic Newton–Schulz iterations.

    Runs in bf16 on CUDA (the iteration tolerates it and it is much faster) and in fp32 elsewhere.
    The result has the input's shape and dtype.
    """
    if matrix.ndim != 2:
        raise ValueError(f"orthogonalize expects a matrix, got shape {tuple(matrix.shape)}")
    a, b, c = _NS_COEFFICIENTS
    work_dtype = torch.bfloat16 if matrix.is_cuda else torch.float32
    x = matrix.to(work_dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation so the Gram matrix x x^T is the small one
        x = x.T
    x = x / (x.norm() + eps)  # Frobenius normalisation bounds the spectral norm by 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.T
    return x.to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum + Newton–Schulz orthogonalisation for 2-D parameters (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}; expected a value in [0, 1)")
        if ns_steps < 1:
            raise ValueError(f"Invalid ns_steps: {ns_steps}; expected at least 1")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps}
        defaults["weight_decay"] = weight_decay
        super().__init__(params, defaults)
        for group in self.param_groups:
            unknown = set(group) - _GROUP_KEYS
            if unknown:
                raise ValueError(f"Muon param group has unknown keys {sorted(unknown)}")
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(p.grad)
                direction = p.grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                update = orthogonalize(direction, group["ns_steps"])
                if group["weight_decay"]:
                    p.mul_(1.0 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
        return loss
