"""The MoFaSGD optimizer: low-rank factored momentum for matrices, AdamW for everything else."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw

from mofasgd import data_parallel as dp
from mofasgd import factor_math as fm
from mofasgd.memory import optimizer_state_bytes

_INITS = ("weight", "gradient")
_GROUP_KEYS_NOT_HYPERPARAMS = {"params", "name", "initial_lr"}
_PENDING = ("GV", "GtU")


def _check_range(name: str, value: Any, low: float, high: float | None = None, high_open: bool = False) -> None:
    ok = value >= low and (high is None or (value < high if high_open else value <= high))
    if not ok:
        upper = "" if high is None else (f", {high})" if high_open else f", {high}]")
        raise ValueError(f"Invalid {name}: {value!r}; expected a value in [{low}{upper or ', inf)'}")


class MoFaSGD(torch.optim.Optimizer):
    r"""Momentum Factorized SGD (Mahdavinia & Mahdavi, TMLR 2025), with an AdamW side for non-matrix params.

    For every managed matrix W (m x n) the momentum is kept as a rank-r SVD M = U diag(S) V^T::

        G_hat  = U U^T G + G V V^T - U U^T G V V^T               (tangent projection; needs only GV, G^T U)
        M      = SVD_r(beta_t M + G_hat)                           (2r x 2r core after two thin QRs)
        D      = SVD_r(beta_t M + G_hat) if nesterov else M       (look-ahead in the same 2r bases)
        W     <- W (1 - lr wd)
        W     <- W - lr (eta1 U_D diag(s_hat) V_D^T + eta2 (I - P_U) G (I - P_V))
        s_hat  = 1 (use_ones_for_nonzero_s) or min(1 / S_D, max_value); 0 where S_D <= eps

    P_U, P_V use the previous factors, or the new ones with ``use_current_projection``. beta_t warms up
    linearly from ``beta_start`` to ``beta_end`` over ``beta_warmup_steps`` steps when those are set.

    Param groups carry ``mofasgd`` (default True). Managed groups must hold 2-D tensors only: give
    embeddings, the LM head, norms, biases and scalars a group with ``"mofasgd": False``; those are
    updated with torch's AdamW (``adam_betas``, ``adam_eps``, ``weight_decay``) inside this optimizer::

        MoFaSGD([{"params": hidden_matrices}, {"params": others, "mofasgd": False, "lr": 3e-4}], lr=1e-3, rank=8)

    With ``fused=True`` each managed gradient is projected to (G V, G^T U) in a post-accumulate-grad hook
    and freed at once, so no m x n gradient outlives backward(); accumulation over several backward
    passes stays exact because the projections are linear. ``eta2 > 0`` needs the whole gradient, so it
    requires ``fused=False``. Factor math is fp32 (fp64 for fp64 parameters) whatever the parameter dtype.

    State per managed matrix is tensors only: ``U``, ``S``, ``V``, ``step`` (plus ``GV``/``GtU`` while a
    fused accumulation is pending), so checkpoints load with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        rank: int = 2,
        beta: float = 0.9,
        eta1: float = 1.0,
        eta2: float = 0.0,
        eps: float = 1e-4,
        max_value: float = 1e4,
        use_ones_for_nonzero_s: bool = False,
        use_current_projection: bool = False,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        beta_start: float | None = None,
        beta_end: float | None = None,
        beta_warmup_steps: int = 0,
        init: str = "weight",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        fused: bool = True,
        data_parallel: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            rank=rank,
            beta=beta,
            eta1=eta1,
            eta2=eta2,
            eps=eps,
            max_value=max_value,
            use_ones_for_nonzero_s=use_ones_for_nonzero_s,
            use_current_projection=use_current_projection,
            nesterov=nesterov,
            weight_decay=weight_decay,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_warmup_steps=beta_warmup_steps,
            init=init,
            adam_betas=adam_betas,
            adam_eps=adam_eps,
            mofasgd=True,
        )
        self.fused = bool(fused)
        self.data_parallel = bool(data_parallel)
        self._pending_synced = True
        if self.data_parallel and not self.fused:
            raise ValueError(
                "data_parallel=True averages the fused projections across ranks; with fused=False DDP already "
                "averages .grad, so leave data_parallel=False"
            )
        self._hook_handles: list[Any] = []
        self._group_index: dict[torch.Tensor, int] = {}
        self._validate_group(defaults, where="argument")
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ construction and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its keys and values; register projection hooks in fused mode."""
        unknown = set(param_group) - set(self.defaults) - _GROUP_KEYS_NOT_HYPERPARAMS
        if unknown:
            raise ValueError(
                f"Unknown MoFaSGD param-group key(s) {sorted(unknown)}; valid keys: {sorted(self.defaults)}"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group, where="param group")
        for p in group["params"]:
            self._group_index[p] = len(self.param_groups) - 1
            if group["mofasgd"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"MoFaSGD manages 2-D matrices only; got a parameter of shape {tuple(p.shape)} in a group "
                        'with "mofasgd": True. Put it in a group with "mofasgd": False (AdamW).'
                    )
                if self.fused and p.requires_grad:
                    self._hook_handles.append(p.register_post_accumulate_grad_hook(self._consume_gradient))

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        _check_range(f"lr ({where})", group["lr"], 0.0)
        if not isinstance(group["rank"], int) or isinstance(group["rank"], bool) or group["rank"] <= 0:
            raise ValueError(f"Invalid rank ({where}): {group['rank']!r}; expected a positive integer")
        _check_range(f"beta ({where})", group["beta"], 0.0, 1.0, high_open=True)
        _check_range(f"eta1 ({where})", group["eta1"], 0.0)
        _check_range(f"eta2 ({where})", group["eta2"], 0.0)
        _check_range(f"eps ({where})", group["eps"], 0.0)
        _check_range(f"max_value ({where})", group["max_value"], 0.0)
        _check_range(f"weight_decay ({where})", group["weight_decay"], 0.0)
        _check_range(f"adam_eps ({where})", group["adam_eps"], 0.0)
        for i, b in enumerate(group["adam_betas"]):
            _check_range(f"adam_betas[{i}] ({where})", b, 0.0, 1.0, high_open=True)
        steps = group["beta_warmup_steps"]
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"Invalid beta_warmup_steps ({where}): {steps!r}; expected an integer >= 0")
        if steps > 0:
            for key in ("beta_start", "beta_end"):
                if group[key] is None:
                    raise ValueError(f"beta_warmup_steps > 0 needs {key} ({where}); set beta_start and beta_end")
                _check_range(f"{key} ({where})", group[key], 0.0, 1.0, high_open=True)
        if group["init"] not in _INITS:
            raise ValueError(f"Invalid init ({where}): {group['init']!r}; expected one of {_INITS}")
        if self.data_parallel and group["mofasgd"] and group["init"] == "gradient":
            raise ValueError(
                f"init='gradient' ({where}) would give each rank its own factors under data_parallel=True; "
                "use init='weight'"
            )
        if self.fused and group["mofasgd"] and group["eta2"] > 0:
            raise ValueError(
                f"eta2={group['eta2']} ({where}) needs the whole gradient, which fused=True frees during "
                "backward; use fused=False or eta2=0"
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_hook_handles", [])
        self.__dict__.setdefault("_pending_synced", True)
        self.__dict__.setdefault("_group_index", {p: i for i, g in enumerate(self.param_groups) for p in g["params"]})

    def remove_hooks(self) -> None:
        """Detach the fused-mode gradient hooks (e.g. before handing the model to another optimizer)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    # ------------------------------------------------------------------ gradient intake
    def _init_factors(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor | None) -> dict[str, Any]:
        state = self.state[p]
        if "U" in state:
            return state
        dtype = fm.factor_dtype(p.dtype)
        rank = fm.effective_rank(group["rank"], p.shape)
        if group["init"] == "weight":
            factors = fm.top_singular_triplets(p.detach().to(dtype), rank)
            U, S, V = factors.U, factors.S, factors.V
        else:
            source = grad if grad is not None else p.grad
            U, V = fm.randomized_subspaces(source.detach(), rank, dtype, seed=p.shape[0] * 7919 + p.shape[1])
            S = torch.zeros(rank, dtype=dtype, device=p.device)
        state["U"], state["S"], state["V"] = U, S, V
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    @torch.no_grad()
    def _consume_gradient(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: add (G V, G^T U) to the pending sums and free the m x n gradient."""
        if p.grad is None:
            return
        state = self._init_factors(p, self.param_groups[self._group_index[p]], p.grad)
        gv, gtu = fm.project_gradient(p.grad, state["U"], state["V"])
        if "GV" in state:
            state["GV"].add_(gv)
            state["GtU"].add_(gtu)
        else:
            state["GV"], state["GtU"] = gv, gtu
        p.grad = None
        self._pending_synced = False

    @torch.no_grad()
    def _synchronize_pending(self) -> None:
        """Average pending projections over data-parallel ranks once per accumulation window.

        Every rank contributes every managed matrix (zeros where it saw no gradient) plus a flag, so the
        collective is the same on all ranks; a matrix no rank saw a gradient for stays without one.
        """
        if not self.data_parallel or self._pending_synced or dp.world_size() == 1:
            return
        flags, tensors = [], []
        for group in self.param_groups:
            if not group["mofasgd"]:
                continue
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                state = self._init_factors(p, group, None)
                flag = torch.ones(1, dtype=state["U"].dtype, device=state["U"].device)
                if "GV" not in state:
                    flag.zero_()
                    state["GV"], state["GtU"] = torch.zeros_like(state["U"]), torch.zeros_like(state["V"])
                flags.append((state, flag))
                tensors += [state["GV"], state["GtU"], flag]
        dp.average_in_place(tensors)
        seen_anywhere = torch.cat([flag for _, flag in flags]).tolist() if flags else []  # one device sync
        for (state, _), seen in zip(flags, seen_anywhere):
            if seen == 0.0:
                for key in _PENDING:
                    state.pop(key)
        self._pending_synced = True

    def _pending_projections(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(G V, G^T U) of the gradient the next step consumes, or None when p received no gradient."""
        state = self.state[p]
        if self.fused:
            return (state["GV"], state["GtU"]) if "GV" in state else None
        if p.grad is None:
            return None
        state = self._init_factors(p, group, p.grad)
        return fm.project_gradient(p.grad, state["U"], state["V"])

    def _consumes_whole_gradient(self, group: dict[str, Any]) -> bool:
        return not self.fused and group["eta2"] > 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and, in fused mode, the pending projections of managed matrices."""
        super().zero_grad(set_to_none=set_to_none)
        for state in self.state.values():
            for key in _PENDING:
                state.pop(key, None)
        self._pending_synced = True

    # ------------------------------------------------------------------ norms and clipping
    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Exact global L2 norm of what the next step consumes, over every parameter of this optimizer.

        AdamW parameters contribute ||G||. A managed matrix contributes ||G_hat|| (its tangent projection,
        from the projections alone), or ||G|| when the step uses the whole gradient (fused=False, eta2 > 0).
        """
        self._synchronize_pending()
        total = torch.zeros((), dtype=torch.float64)
        for group in self.param_groups:
            for p in group["params"]:
                total += self._consumed_norm_sq(p, group).double().cpu()
        return total.sqrt()

    def _consumed_norm_sq(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        if not group["mofasgd"] or self._consumes_whole_gradient(group):
            return p.grad.float().square().sum() if p.grad is not None else torch.zeros(())
        pending = self._pending_projections(p, group)
        if pending is None:
            return torch.zeros(())
        return fm.tangent_norm_sq(self.state[p]["U"], *pending).clamp_min(0)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
        """Scale every consumed gradient so the global norm is at most max_norm; return the norm before."""
        norm = self.grad_norm()
        coef = float(max_norm) / (float(norm) + eps)
        if coef < 1.0:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(coef)
                    for key in _PENDING:
                        if key in self.state.get(p, {}):
                            self.state[p][key].mul_(coef)
        return norm

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step for every group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._synchronize_pending()
        for group in self.param_groups:
            if group["mofasgd"]:
                for p in group["params"]:
                    self._matrix_step(p, group)
            else:
                self._adamw_step(group)
        return loss

    @staticmethod
    def current_beta(group: dict[str, Any], step: int) -> float:
        """Return beta for the step after `step` completed ones: linear warm-up when beta_warmup_steps > 0."""
        warmup = group["beta_warmup_steps"]
        if warmup <= 0:
            return group["beta"]
        frac = min(step / warmup, 1.0)
        return group["beta_start"] + (group["beta_end"] - group["beta_start"]) * frac

    def _matrix_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        pending = self._pending_projections(p, group)
        if pending is None:
            return
        state = self.state[p]
        gv, gtu = pending
        U, S, V = state["U"], state["S"], state["V"]
        rank = U.shape[1]
        beta = self.current_beta(group, int(state["step"].item()))
        core = fm.momentum_core(U, S, V, gv, gtu, beta)
        new = fm.truncate(core.q_u, core.q_v, core.core, rank)
        direction = fm.nesterov_direction(core, new, beta, rank) if group["nesterov"] else new

        lr = group["lr"]
        if group["weight_decay"] != 0:
            p.mul_(1.0 - lr * group["weight_decay"])
        scale = fm.step_scaling(direction.S, group["eps"], group["max_value"], group["use_ones_for_nonzero_s"])
        left = (direction.U * scale).to(p.dtype)
        p.addmm_(left, direction.V.T.to(p.dtype), alpha=-lr * group["eta1"])
        if self._consumes_whole_gradient(group):
            basis_u, basis_v = (new.U, new.V) if group["use_current_projection"] else (U, V)
            self._complement_step(p, p.grad, basis_u, basis_v, -lr * group["eta2"])

        state["U"], state["S"], state["V"] = new.U, new.S, new.V
        state["step"] += 1
        for key in _PENDING:
            state.pop(key, None)

    @staticmethod
    def _complement_step(p: torch.Tensor, grad: torch.Tensor, U: torch.Tensor, V: torch.Tensor, alpha: float) -> None:
        """Apply p += alpha (I - UU^T) G (I - VV^T), as G - U (G^T U)^T - (GV - U U^T G V) V^T: no m x m / n x n."""
        gv, gtu = fm.project_gradient(grad, U, V)
        p.add_(grad.to(p.dtype), alpha=alpha)
        p.addmm_(U.to(p.dtype), gtu.T.to(p.dtype), alpha=-alpha)
        p.addmm_((gv - U @ (U.T @ gv)).to(p.dtype), V.T.to(p.dtype), alpha=-alpha)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["adam_betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["adam_eps"],
            maximize=False,
        )

    # ------------------------------------------------------------------ introspection
    def state_bytes(self) -> int:
        """Bytes held in optimizer state right now (factors, steps, AdamW moments, pending projections)."""
        return optimizer_state_bytes(self)

    @staticmethod
    def expected_factor_bytes(shape: torch.Size | tuple[int, int], rank: int, dtype=torch.float32) -> int:
        """Bytes of U, S, V for an m x n matrix at `rank` (excluding the step counter)."""
        m, n = shape
        r = min(rank, m, n)
        return ((m + n) * r + r) * torch.empty((), dtype=dtype).element_size()
