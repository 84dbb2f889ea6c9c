"""GaLore AdamW whose gradient projection runs inside backward, so GaLore matrices keep no full gradient."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from galore_torch import GaLoreAdamW
from galore_torch.galore_projector import GaLoreProjector

from mofasgd.hooks import HookRegistry

GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


class FusedGaLoreAdamW(GaLoreAdamW):
    r"""GaLoreAdamW (galore-torch 1.0) with the projection of each GaLore gradient fused into backward.

    A param group that carries the GaLore keys ``rank``, ``update_proj_gap``, ``scale`` and ``proj_type``
    manages its 2-D matrices in GaLore's low-rank space; every other group is plain AdamW. The update is
    exactly the one ``galore_torch.GaLoreAdamW`` makes from the same accumulated gradient::

        for each GaLore matrix W (m x n), with t = number of steps W has taken:
          backward, after every accumulation into W.grad (post-accumulate-grad hook):
            if t % update_proj_gap == 0 (or W has no projector yet):
              leave W.grad alone                      # the refresh needs the whole accumulated gradient
            else:
              R += P(W.grad)  (fp32);  W.grad = None  # P is linear, so the sum over micro-batches is exact
          step():
            if W.grad is held:  P <- top-r SVD basis of W.grad (GaLoreProjector);  R = P(W.grad);  W.grad = None
            m <- b1 m + (1 - b1) R;   v <- b2 v + (1 - b2) R*R           # in W's dtype, like GaLoreAdamW
            W <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * P^T(m / (sqrt(v) + eps))
            W <- W - lr * wd * W

    Memory: between optimizer steps a GaLore matrix holds its low-rank accumulator R (fp32, the shape of
    ``P(G)``, i.e. r x max(m, n) for ``proj_type="std"``) instead of an m x n gradient. On projector-refresh
    steps (the first step and every ``update_proj_gap``-th after it) GaLore matrices hold their full gradient
    until ``step()``, exactly like non-fused GaLore, so the peak memory of a run that crosses a refresh step
    is that of non-fused GaLore for the gradients; measure steady-state memory on any other step.

    Gradient clipping by ``torch.nn.utils.clip_grad_norm_`` over ``model.parameters()`` cannot see the
    consumed gradients. Use :meth:`grad_norm` / :meth:`clip_grad_norm_`, which cover the low-rank gradients
    of GaLore matrices (the norm of the projected gradient, which is what the step consumes) and the full
    gradients of the rest. Single process only: the hook sees the local gradient before any data-parallel
    averaging, so a ``torch.distributed`` world larger than one is refused.

    Param groups (what LLaMA-Factory's ``use_galore`` builds, and what this class expects)::

        galore = [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(name)]
        others = [p for p in model.parameters() if p.requires_grad and all(p is not g for g in galore)]
        FusedGaLoreAdamW(
            [
                {"params": others, "weight_decay": 0.0},
                {"params": galore, "rank": 8, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
            ],
            lr=1e-5,
        )

    Args:
        params: parameters or param-group dicts; GaLore groups carry the four GaLore keys.
        lr: learning rate.
        betas: Adam's (beta1, beta2).
        eps: added to sqrt(v) before the bias correction, as in GaLoreAdamW.
        weight_decay: decoupled weight decay, applied after the update as in GaLoreAdamW.
        correct_bias: Adam bias correction.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise RuntimeError(
                    "FusedGaLoreAdamW projects each process's local gradient during backward, before data-parallel "
                    "averaging; it supports a single process only. Use galore_torch.GaLoreAdamW with several."
                )
        self._group_index: dict[torch.Tensor, int] = {}
        self._pending: dict[torch.Tensor, torch.Tensor] = {}
        self._hooks = HookRegistry(self._absorb_gradient)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            no_deprecation_warning=True,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its GaLore keys; register the projection hook on its matrices."""
        present = [key for key in GALORE_KEYS if key in param_group]
        if present and len(present) != len(GALORE_KEYS):
            missing = sorted(set(GALORE_KEYS) - set(present))
            raise ValueError(f"A GaLore param group needs all of {list(GALORE_KEYS)}; missing {missing}")
        if present:
            _validate_galore_group(param_group)
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        for p in group["params"]:
            self._group_index[p] = index
            if present:
                if p.dim() != 2:
                    raise ValueError(
                        f"GaLore groups take 2-D matrices only; got a parameter of shape {tuple(p.shape)}. "
                        "Put it in a group without the GaLore keys."
                    )
                self._hooks.register([p])

    def remove_hooks(self) -> None:
        """Detach the projection hooks (e.g. before handing the parameters to another optimizer)."""
        self._hooks.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and the pending low-rank gradients of GaLore matrices."""
        super().zero_grad(set_to_none=set_to_none)
        self._pending.clear()

    def _is_galore(self, group: dict[str, Any]) -> bool:
        return "rank" in group

    def _refresh_due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        step = int(state["step"]) if "step" in state else 0
        return not _has_projector(state) or step % group["update_proj_gap"] == 0

    @torch.no_grad()
    def _absorb_gradient(self, p: torch.Tensor) -> None:
        """Project p.grad into the pending low-rank sum and free it, unless a projector refresh needs it whole."""
        group = self.param_groups[self._group_index[p]]
        state = self.state[p]
        if p.grad is None or self._refresh_due(state, group):
            return
        low_rank = _projector(group, state).project(p.grad, int(state["step"]))
        pending = self._pending.get(p)
        if pending is None:
            self._pending[p] = _accumulator(low_rank)
        else:
            pending.add_(low_rank)
        p.grad = None

    @torch.no_grad()
    def _settle_gradients(self) -> None:
        """Turn every full gradient a GaLore matrix still holds into its low-rank form (refreshing P if due)."""
        for group in self.param_groups:
            if not self._is_galore(group):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
                projector = _projector(group, state)
                low_rank = projector.project(p.grad, int(state["step"]))
                _store_projector(projector, state)
                pending = self._pending.get(p)
                self._pending[p] = _accumulator(low_rank) if pending is None else pending.add_(low_rank)
                p.grad = None

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of what the next step consumes: low-rank gradients of GaLore matrices, full ones else.

        Projector refreshes that are due happen here (the same SVD the step would compute), so the norm is
        that of the projected gradient on refresh steps too.
        """
        self._settle_gradients()
        total = torch.zeros((), dtype=torch.float64)
        for group in self.param_groups:
            for p in group["params"]:
                grad = self._pending.get(p) if self._is_galore(group) else p.grad
                if grad is not None:
                    total += grad.double().square().sum().cpu()
        return total.sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
        """Scale every consumed gradient so that :meth:`grad_norm` is at most max_norm; return the norm before."""
        norm = self.grad_norm()
        coef = float(max_norm) / (float(norm) + eps)
        if coef < 1.0:
            for group in self.param_groups:
                for p in group["params"]:
                    grad = self._pending.get(p) if self._is_galore(group) else p.grad
                    if grad is not None:
                        grad.mul_(coef)
        return norm

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step (GaLoreAdamW's update, from the low-rank gradients accumulated so far)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._settle_gradients()
        for group in self.param_groups:
            galore = self._is_galore(group)
            for p in group["params"]:
                grad = self._pending.pop(p, None) if galore else p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("FusedGaLoreAdamW does not support sparse gradients")
                state = self.state[p]
                state.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
                direction, step_size = _adam_direction(grad.to(p.dtype), state, group)
                if galore:
                    direction = _projector(group, state).project_back(direction)
                p.add_(direction, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def _validate_galore_group(group: dict[str, Any]) -> None:
    rank, gap = group["rank"], group["update_proj_gap"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"Invalid GaLore rank: {rank!r}; expected a positive integer")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
        raise ValueError(f"Invalid update_proj_gap: {gap!r}; expected a positive integer")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"Invalid proj_type: {group['proj_type']!r}; expected one of {PROJ_TYPES}")
    if not isinstance(group["scale"], (int, float)) or isinstance(group["scale"], bool):
        raise ValueError(f"Invalid GaLore scale: {group['scale']!r}; expected a number")


def _accumulator(low_rank: torch.Tensor) -> torch.Tensor:
    """The pending sum starts from the first projection, in at least fp32 (no bf16 rounding of the running sum)."""
    return low_rank.to(torch.promote_types(low_rank.dtype, torch.float32))


def _has_projector(state: dict[str, Any]) -> bool:
    return "ortho" in state or "ortho_left" in state


def _projector(group: dict[str, Any], state: dict[str, Any]) -> GaLoreProjector:
    """A galore-torch projector carrying the basis kept in ``state`` (tensors only, so state_dict stays plain)."""
    projector = GaLoreProjector(
        group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"], proj_type=group["proj_type"]
    )
    if "ortho" in state:
        projector.ortho_matrix = state["ortho"]
    elif "ortho_left" in state:
        projector.ortho_matrix = [state["ortho_left"], state["ortho_right"]]
    return projector


def _store_projector(projector: GaLoreProjector, state: dict[str, Any]) -> None:
    """Keep compact copies: galore-torch returns slices of the SVD factors, which pin the whole factor's storage."""
    if isinstance(projector.ortho_matrix, list):
        state["ortho_left"], state["ortho_right"] = (m.contiguous().clone() for m in projector.ortho_matrix)
    else:
        state["ortho"] = projector.ortho_matrix.contiguous().clone()


def _adam_direction(grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Advance the Adam moments with ``grad`` and return (m / (sqrt(v) + eps), step size), GaLoreAdamW's form."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    beta1, beta2 = group["betas"]
    state["step"] += 1
    step = int(state["step"])
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(group["eps"])
    step_size = group["lr"]
    if group["correct_bias"]:
        step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    return exp_avg / denom, step_size
