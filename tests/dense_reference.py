"""A dense float64 MoFaSGD written straight from docs/algorithm.md §2 (m x n matrices everywhere), for tests only."""

from __future__ import annotations

from typing import Any

import torch

from mofasgd import DEFAULTS


def svd_r(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix)
    return u[:, :rank], s[:rank], vh[:rank].T


class DenseMoFaSGD:
    """Keeps M = U diag(S) V^T but computes beta M + G_hat, the SVD and the update with dense matrices.

    Takes MoFaSGD's options by their names, with MoFaSGD's defaults; those that do not change the math
    (fused, data_parallel, ...) are accepted and ignored.
    """

    def __init__(self, weight: torch.Tensor, **options: Any):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"not MoFaSGD options: {sorted(unknown)}")
        o = {**DEFAULTS, **options}
        self.W = weight.detach().double().clone()
        self.rank = min(o["rank"], *weight.shape)
        self.U, self.S, self.V = svd_r(self.W, self.rank)
        self.lr, self.beta, self.eta1, self.eta2 = o["lr"], o["beta"], o["eta1"], o["eta2"]
        self.eps, self.max_value, self.use_ones = o["eps"], o["max_value"], o["use_ones_for_nonzero_s"]
        self.use_current, self.nesterov, self.wd = o["use_current_projection"], o["nesterov"], o["weight_decay"]

    @property
    def momentum(self) -> torch.Tensor:
        return self.U @ torch.diag(self.S) @ self.V.T

    def tangent(self, grad: torch.Tensor) -> torch.Tensor:
        pu, pv = self.U @ self.U.T, self.V @ self.V.T
        return pu @ grad + grad @ pv - pu @ grad @ pv

    def step(self, grad: torch.Tensor, beta: float | None = None) -> None:
        beta = self.beta if beta is None else beta
        grad = grad.double()
        g_hat = self.tangent(grad)
        U_new, S_new, V_new = svd_r(beta * self.momentum + g_hat, self.rank)
        if self.nesterov:
            dU, dS, dV = svd_r(beta * U_new @ torch.diag(S_new) @ V_new.T + g_hat, self.rank)
        else:
            dU, dS, dV = U_new, S_new, V_new
        if self.use_ones:
            scale = (dS > self.eps).double()
        else:
            scale = torch.where(dS > self.eps, (1.0 / dS).clamp(max=self.max_value), torch.zeros_like(dS))
        PU, PV = (U_new, V_new) if self.use_current else (self.U, self.V)
        m, n = grad.shape
        complement = (torch.eye(m, dtype=grad.dtype) - PU @ PU.T) @ grad @ (torch.eye(n, dtype=grad.dtype) - PV @ PV.T)
        self.W = self.W * (1 - self.lr * self.wd)
        self.W = self.W - self.lr * (self.eta1 * dU @ torch.diag(scale) @ dV.T + self.eta2 * complement)
        self.U, self.S, self.V = U_new, S_new, V_new
