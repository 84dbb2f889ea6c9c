"""A dense float64 MoFaSGD written straight from docs/algorithm.md §2 (m x n matrices everywhere), for tests only."""

from __future__ import annotations

import torch


def svd_r(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix)
    return u[:, :rank], s[:rank], vh[:rank].T


class DenseMoFaSGD:
    """Keeps M = U diag(S) V^T but computes beta M + G_hat, the SVD and the update with dense matrices."""

    def __init__(
        self,
        weight: torch.Tensor,
        rank: int,
        lr: float,
        beta: float = 0.9,
        eta1: float = 1.0,
        eta2: float = 0.0,
        eps: float = 1e-4,
        max_value: float = 1e4,
        use_ones: bool = False,
        use_current_projection: bool = False,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        self.W = weight.detach().double().clone()
        self.rank = min(rank, *weight.shape)
        self.U, self.S, self.V = svd_r(self.W, self.rank)
        self.lr, self.beta, self.eta1, self.eta2 = lr, beta, eta1, eta2
        self.eps, self.max_value, self.use_ones = eps, max_value, use_ones
        self.use_current, self.nesterov, self.wd = use_current_projection, nesterov, weight_decay

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
