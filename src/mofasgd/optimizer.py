"""The MoFaSGD optimizer: low-rank factored momentum for matrices, AdamW for everything else."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch.optim.adamw import adamw

from mofasgd import distribution, projected_linear, sharding
from mofasgd import factor_math as fm
from mofasgd.adamw_side import AdamSettings, adamw_update_fp32_, factored_adam_update_
from mofasgd.bucket_step import (
    BucketInputs,
    BucketOutcome,
    DirectionSettings,
    bucket_direction,
    bucket_directions,
    update_matrix_,
)
from mofasgd.fused_rounding import KernelChoice, adamw_update_
from mofasgd.intake import PENDING_KEYS, GradientIntake, experts_of
from mofasgd.memory import optimizer_state_bytes
from mofasgd.options import DEFAULTS, OPTION, OptionError, validate
from mofasgd.resume import routing_layout
from mofasgd.rounding import GeneratorBank, supports_stochastic_rounding

logger = logging.getLogger("mofasgd")

_GROUP_KEYS_NOT_HYPERPARAMS = {"params", "name", "param_names", "initial_lr"}
_PENDING = PENDING_KEYS
_FACTOR_KEYS = ("U", "S", "V", *_PENDING)
_FACTORED_MOMENT_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col")  # adamw_state="factored*": fp32 whatever the param
_FP32_KEYS = (*_FACTOR_KEYS, *_FACTORED_MOMENT_KEYS)
# Hyper-parameters that fix the shape of the saved state: a checkpoint with other values cannot be resumed.
_SHAPE_KEYS = ("rank", "mofasgd", "adamw_state")
_RNG_KEY = "mofasgd_rng"
_SIDE_CLIP_KEY = "mofasgd_side_clip_coef"  # fused_adamw_side: the coefficient the next hooked updates use
# Diagnostics warn (once) when a matrix's gradient sustains less than this share of its momentum: ||G_hat|| <
# _VANISHING_SUPPORT (1 - beta) S_max. The weight init's decay stays above it (gradients of 1e-3 of the weight's top
# singular value give 1e-2); a zero gradient (every label masked) gives 0.
_VANISHING_SUPPORT = 1e-3
# Largest |U^T U - I| entry accepted for loaded fp32 factors (fresh QR factors are ~1e-6 off).
_ORTHONORMAL_TOL = {torch.float32: 1e-3, torch.float64: 1e-8}


def _same_value(a: Any, b: Any) -> bool:
    """Equal hyper-parameter values, a tuple and the list a checkpoint may hold for it included."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"({', '.join(map(_show, value))})"
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """||grad||^2 through the norm's own upcast: one copy at most fp32, not an fp64 copy squared into another."""
    return torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32)).square()


class _Bucket(NamedTuple):
    """Managed matrices of one (shape, dtype, device, rank) that hold a gradient now, with their tensors stacked.

    Built by :meth:`MoFaSGD._buckets` for ``grad_norm`` and the step; in fused mode ``gv`` and ``gtu`` are the
    intake's pending buffers themselves (:class:`~mofasgd.intake.PendingBucket`) when every entry holds a gradient.
    An entry is one matrix: a managed 2-D parameter, or one expert of a 3-D stack (its slice, updated in place).
    """

    params: list[torch.Tensor]  # per entry: the matrix updated in place
    states: list[dict[str, Any]]  # per entry: its tensor's state (a stack of experts' repeats for each expert)
    U: torch.Tensor  # B x m x r (FSDP2: this rank's rows)
    S: torch.Tensor  # B x r
    V: torch.Tensor  # B x n x r
    gv: torch.Tensor  # B x m x r
    gtu: torch.Tensor  # B x n x r
    rows: sharding.RowGroup | None  # FSDP2: how the rows of U and G V meet across ranks


def _shares_storage(stack: torch.Tensor, first: torch.Tensor) -> bool:
    """Whether a bucket's stack is a view over the first entry's own memory (not a fresh copy of the entries)."""
    return stack.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()


def _warmed_beta(group: dict[str, Any], step: float | torch.Tensor) -> float | torch.Tensor:
    """The beta after `step` completed steps (a number, or a tensor of counts: no host read): its linear warm-up."""
    warmup = group["beta_warmup_steps"]
    if warmup <= 0:
        return group["beta"]
    frac = step / warmup
    frac = frac.clamp_max(1.0) if torch.is_tensor(frac) else min(frac, 1.0)
    return group["beta_start"] + (group["beta_end"] - group["beta_start"]) * frac


def _stacked(tensors: list[torch.Tensor], experts: int | None = None) -> torch.Tensor:
    """The tensors stacked along a new first dim; a view when they are one tensor or the consecutive slices of one.

    With `experts` (E) each tensor is already a stack of E experts' factors: they are concatenated along their first
    dim instead. The factors a bucket step stores are slices of its batched results, so the next step reads them
    without a copy.
    """
    first = tensors[0]
    if len(tensors) == 1:
        return first.unsqueeze(0) if experts is None else first
    skip = 0 if experts is None else 1  # the dims each tensor shares with the stacked result
    inner_shape, inner_stride = first.shape[skip:], first.stride()[skip:]
    base = first._base
    if (
        base is not None
        and base.shape[0] == len(tensors) * (experts or 1)
        and base.shape[1:] == inner_shape
        and base.stride()[1:] == inner_stride
        and all(t._base is base for t in tensors)
        and [t.storage_offset() for t in tensors]
        == list(
            range(
                base.storage_offset(),
                base.storage_offset() + len(tensors) * (experts or 1) * base.stride(0),
                (experts or 1) * base.stride(0),
            )
        )
    ):
        return base
    return torch.stack(tensors) if experts is None else torch.cat(tensors)


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

    A vanishing gradient lets S decay by beta per step, so the 1/S step grows without bound. The opt-in guard
    ``min_gradient_support`` = tau > 0 multiplies s_hat_i by min(1, support_i / tau), support_i = ||G_hat|| /
    ((1 - beta_t) S_D,i): 1 in the steady state of a constant gradient, 0 for a zero gradient (docs/algorithm.md
    section 2). The default 0 keeps the authors' step.

    Param groups carry ``mofasgd`` (default True). Managed groups hold matrices: 2-D tensors, or 3-D stacks of E
    expert matrices (transformers' fused MoE experts, E x m x n), each expert its own matrix with its own factors
    (state U: E x m x r, S: E x r, V: E x n x r, one step counter). Give embeddings, the LM head, norms, biases and
    scalars a group with ``"mofasgd": False``; those are updated with torch's AdamW (``adam_betas``, ``adam_eps``,
    ``weight_decay``) inside this optimizer::

        MoFaSGD([{"params": hidden_matrices}, {"params": others, "mofasgd": False, "lr": 3e-4}], lr=1e-3, rank=8)

    With ``fused=True`` each managed gradient is projected to (G V, G^T U) in a post-accumulate-grad hook
    and freed at once, so no m x n gradient outlives backward(); accumulation over several backward
    passes stays exact because the projections are linear. With ``projected_backward=True`` (the default) and
    :meth:`attach` called on the model, the weights of ``nn.Linear`` modules skip even that: their backward forms
    G V = dY^T (X V) and G^T U = X^T (dY U) directly and no weight gradient is ever formed
    (:mod:`mofasgd.projected_linear`). A managed ``.grad`` that no hook consumed
    (parameter unfrozen after construction, gradient set by hand) is consumed at ``step()``. ``eta2 > 0``
    needs the whole gradient, so it requires ``fused=False``. Factor math is fp32 (fp64 for fp64
    parameters) whatever the parameter dtype.

    bf16 parameters: with ``stochastic_rounding`` (None = on for bf16 parameters) each update is computed in
    fp32 and rounded stochastically to bf16, so that small updates survive in expectation; the random bits
    come from the optimizer's own generator (``seed``), saved in its state dict. fp32 parameters are untouched
    by the option. A matrix whose gradient projections are not finite skips its update (factors and weight
    kept), like AMP's scaler skips a step; the count is logged.

    State per managed matrix is tensors only: ``U``, ``S``, ``V``, ``step`` (plus ``GV``/``GtU`` while a
    fused accumulation is pending), so checkpoints load with ``torch.load(weights_only=True)``.

    FSDP2 (``fully_shard``): managed matrices may be DTensors sharded along rows. Each rank then keeps U's rows
    of its shard (a DTensor, so distributed checkpoints shard it like W) and all of V and S; G V stays local,
    G^T U and the (2r)^2 Gram matrices are all-reduced (module ``sharding``). This needs ``fused=True`` and
    ``data_parallel=False`` (FSDP2 already averages the gradient), and an init from the weight.

    AdamW side (docs/algorithm.md section 7): ``adamw_state`` = ``"factored"`` / ``"factored_no_momentum"`` keeps
    Adafactor's factored second moment (O(m + n)) for its matrices; ``fused_adamw_side=True`` updates those
    matrices in their gradient hooks at the end of an accumulation window (``accumulating`` /
    ``accumulation_boundary``), with the previous step's clipping coefficient.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = DEFAULTS["lr"],
        rank: int = DEFAULTS["rank"],
        beta: float = DEFAULTS["beta"],
        eta1: float = DEFAULTS["eta1"],
        eta2: float = DEFAULTS["eta2"],
        eps: float = DEFAULTS["eps"],
        max_value: float = DEFAULTS["max_value"],
        use_ones_for_nonzero_s: bool = DEFAULTS["use_ones_for_nonzero_s"],
        use_current_projection: bool = DEFAULTS["use_current_projection"],
        nesterov: bool = DEFAULTS["nesterov"],
        weight_decay: float = DEFAULTS["weight_decay"],
        min_gradient_support: float = DEFAULTS["min_gradient_support"],
        beta_start: float | None = DEFAULTS["beta_start"],
        beta_end: float | None = DEFAULTS["beta_end"],
        beta_warmup_steps: int = DEFAULTS["beta_warmup_steps"],
        init: str = DEFAULTS["init"],
        adam_betas: tuple[float, float] = DEFAULTS["adam_betas"],
        adam_eps: float = DEFAULTS["adam_eps"],
        adamw_state: str = DEFAULTS["adamw_state"],
        stochastic_rounding: bool | None = DEFAULTS["stochastic_rounding"],
        fused: bool = DEFAULTS["fused"],
        fused_adamw_side: bool = DEFAULTS["fused_adamw_side"],
        data_parallel: bool = DEFAULTS["data_parallel"],
        projected_backward: bool = DEFAULTS["projected_backward"],
        seed: int = DEFAULTS["seed"],
        capturable: bool = DEFAULTS["capturable"],
        rounding_kernel: str = DEFAULTS["rounding_kernel"],
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
            min_gradient_support=min_gradient_support,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_warmup_steps=beta_warmup_steps,
            init=init,
            adam_betas=adam_betas,
            adam_eps=adam_eps,
            adamw_state=adamw_state,
            stochastic_rounding=stochastic_rounding,
            mofasgd=True,
        )
        validate(
            {
                **defaults,
                "fused": fused,
                "fused_adamw_side": fused_adamw_side,
                "data_parallel": data_parallel,
                "projected_backward": projected_backward,
                "seed": seed,
                "capturable": capturable,
                "rounding_kernel": rounding_kernel,
            },
            where="argument",
        )
        self.fused = fused
        self.fused_adamw_side = fused_adamw_side
        self.data_parallel = data_parallel
        self.projected_backward = projected_backward
        self.capturable = capturable
        self.attachment: projected_linear.Attachment | None = None  # what attach() patched
        # fused AdamW side: whether this backward ends an accumulation window (set `accumulating`, or give a callable)
        self.accumulating = False
        self.accumulation_boundary: Callable[[], bool] | None = None
        # (||g||^2, is an FSDP2 shard's share) of the AdamW-side grads consumed in hooks this step
        self._side_norm_sq: list[tuple[torch.Tensor, bool]] = []
        self._side_nonfinite: list[torch.Tensor] = []  # hooked AdamW-side params whose gradient was not finite
        self._side_clip_coef = 1.0  # the last clip_grad_norm_'s coefficient, applied to the next hooked updates
        self.intake = GradientIntake(self)  # pending projections and every gradient hook
        self._group_index: dict[torch.Tensor, int] = {}
        self._rng = GeneratorBank(seed)
        self.rounding_kernel = KernelChoice(rounding_kernel)  # per device: compiled or eager bf16 updates
        self._diagnostics: dict[str, list[torch.Tensor]] | None = None
        self._nonfinite: torch.Tensor | None = None
        self._nonfinite_total = 0
        self._skipped_steps: torch.Tensor | None = None  # capturable: whole steps skipped, counted on the device
        # capturable: the learning rates as device tensors, by (group index, device, dtype)
        self._lrs: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._finite_norm = False  # clip_grad_norm_ read a finite norm of what the next step consumes
        self._warned_vanishing = False  # the vanishing-gradient warning of pop_diagnostics is given once
        self._sharded = False  # any managed matrix is an FSDP2 DTensor
        self._resolved: distribution.Distribution | None = None  # how the ranks meet: see _distribution()
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
            if group["mofasgd"] and p.dim() not in (2, 3):
                raise ValueError(
                    f"MoFaSGD manages 2-D matrices and 3-D stacks of expert matrices only; got {self._describe(p)} "
                    'in a group with "mofasgd": True. Put it in a group with "mofasgd": False (AdamW).'
                )
            if group["mofasgd"] and p.dim() == 3 and self._consumes_whole_gradient(group):
                raise ValueError(
                    f"eta2={group['eta2']} needs each matrix's whole gradient, which is not supported for a stack of "
                    f"expert matrices ({self._describe(p)}); use eta2=0, or put the experts in a group of their own "
                    "with eta2=0."
                )
            if group["mofasgd"] and sharding.is_dtensor(p):
                self._check_sharded(p, group)
            self._check_adamw_side_layout(p, group)
            if (
                group["stochastic_rounding"]
                and p.is_floating_point()
                and p.dtype not in (torch.float32, torch.float64)
            ):
                if not supports_stochastic_rounding(p.dtype):
                    raise ValueError(
                        f"stochastic_rounding=True supports bf16 parameters; {self._describe(p)} is {p.dtype}. "
                        "Use bf16 weights or stochastic_rounding=None/False."
                    )
        self.intake.rebuild()
        if self.fused:
            self.intake.hook_matrices()
            self.intake.hook_adamw_side()

    def _check_adamw_side_layout(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Refuse an AdamW-side state that does not run on FSDP2 shards (mofasgd.options.ENGINE_RULES)."""
        if not group["mofasgd"] and p.dim() == 2 and sharding.is_dtensor(p):
            try:
                validate({"adamw_state": group["adamw_state"], "mofasgd": False}, engine="fsdp2")
            except OptionError as error:
                raise OptionError(
                    f"{self._describe(p)} is FSDP2-sharded: {error}", error.option, error.options, rule=error.rule
                ) from None

    def _check_sharded(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Refuse what the row-sharded (FSDP2) step does not support, naming the matrix and the fix."""
        if p.dim() == 3:
            raise ValueError(
                f"{self._describe(p)} is an FSDP2-sharded stack of expert matrices: MoFaSGD steps experts only "
                "unsharded (DDP or one process). Route the experts to AdamW (an `mfsgd_target` without them, e.g. "
                "`q_proj,k_proj,v_proj,o_proj`), or train without FSDP."
            )
        sharding.check_row_sharded(p, self._describe(p))
        options = {key: value for key, value in group.items() if key in OPTION or key == "mofasgd"}
        try:
            validate(
                {**options, "fused": self.fused, "data_parallel": self.data_parallel, "capturable": self.capturable},
                engine="fsdp2",
            )
        except OptionError as error:
            raise OptionError(
                f"{self._describe(p)} is FSDP2-sharded; MoFaSGD cannot step it: {error}",
                error.option,
                error.options,
                rule=error.rule,
            ) from None
        self._sharded = True

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        """The option rules (mofasgd.options) on a param group's values, with this optimizer's own options."""
        options = {key: value for key, value in group.items() if key in OPTION or key == "mofasgd"}
        validate(
            {**options, "fused": self.fused, "data_parallel": self.data_parallel, "capturable": self.capturable},
            where=where,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fused_adamw_side", False)
        self.__dict__.setdefault("projected_backward", True)
        self.__dict__.setdefault("capturable", False)
        self.__dict__.setdefault("_resolved", None)
        self.__dict__.setdefault("attachment", None)
        self.__dict__.setdefault("accumulating", False)
        self.__dict__.setdefault("accumulation_boundary", None)
        self.__dict__.setdefault("_side_norm_sq", [])
        self.__dict__.setdefault("_side_nonfinite", [])
        self.__dict__.setdefault("_side_clip_coef", 1.0)
        self.__dict__.setdefault("_rng", GeneratorBank(0))
        self.__dict__.setdefault("rounding_kernel", KernelChoice("auto"))
        self.__dict__.setdefault("_diagnostics", None)
        self.__dict__.setdefault("_nonfinite", None)
        self.__dict__.setdefault("_skipped_steps", None)
        self.__dict__.setdefault("_lrs", {})
        self.__dict__.setdefault("_nonfinite_total", 0)
        self.__dict__.setdefault("_finite_norm", False)
        self.__dict__.setdefault("_warned_vanishing", False)
        self.__dict__.setdefault("_sharded", False)
        self._group_index = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        if "intake" not in self.__dict__:
            self.intake = GradientIntake(self)
            self.intake.rebuild()

    def remove_hooks(self) -> None:
        """Detach the fused-mode gradient hooks and the projected Linear forwards (e.g. before another optimizer)."""
        self.intake.remove_hooks()
        if self.attachment is not None:
            self.attachment.detach()

    def attach(self, model: torch.nn.Module, reason: str | None = None) -> projected_linear.Attachment:
        """Train the managed weights of `model`'s ``nn.Linear`` modules through the projected backward.

        Their backward then forms only G V and G^T U (no weight gradient, no weight-gradient GEMM); every other
        managed matrix keeps the post-accumulate-grad hook. Returns what went where, with reasons
        (:meth:`~mofasgd.projected_linear.Attachment.table`). Without this call every matrix takes the hook path.
        `reason`: why the caller keeps every matrix on the hook path (e.g. the model will be FSDP2-sharded).
        """
        if self.attachment is not None:
            self.attachment.detach()
        names = {id(p): n for n, p in model.named_parameters()}
        managed = {
            id(p): names.get(id(p), self._describe(p)) for g in self.param_groups if g["mofasgd"] for p in g["params"]
        }
        refusal = self._projection_refusal() or reason
        notes = {
            id(p): "first step forms dW once: init='gradient'"
            for g in self.param_groups
            if g["mofasgd"] and g["init"] == "gradient"
            for p in g["params"]
            if "U" not in self.state.get(p, {})
        }
        self.attachment = projected_linear.attach(model, self.intake, managed, refusal, notes)
        return self.attachment

    def _projection_refusal(self) -> str | None:
        """Why no managed matrix can take the projected backward under this optimizer's settings, or None."""
        if not self.projected_backward:
            return "projected_backward=False"
        if not self.fused:
            if any(g["mofasgd"] and g["eta2"] > 0 for g in self.param_groups):
                return "eta2 > 0 needs the dense gradient (fused=False)"
            return "fused=False keeps the dense gradient"
        if self._sharded:
            return "FSDP2 shards the weight"
        return None

    def _describe(self, p: torch.Tensor) -> str:
        """`name` (shape) of a parameter when its group carries param_names, else its group, index and shape."""
        shape = f"shape {tuple(p.shape)}"
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return f"`{names[pi]}` of {shape}" if names else f"param group {gi} parameter {pi} of {shape}"
        return f"a parameter of {shape}"

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state dict plus the rounding generators' states and the fused side's clip coefficient.

        The coefficient (fused_adamw_side) is the one the next hooked updates use, so a resume continues exactly.
        It is written into every param group, the part of the dict that torch.distributed.checkpoint keeps.
        """
        state = super().state_dict()
        rng = self._rng.state()
        if rng:
            state[_RNG_KEY] = rng
        if self.fused_adamw_side:
            for group in state["param_groups"]:  # torch packs copies of the groups: ours stay as they are
                group[_SIDE_CLIP_KEY] = self._side_clip_coef
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a MoFaSGD state dict, refusing checkpoints that do not fit this optimizer with a clear reason.

        Factors keep their fp32 dtype (torch would cast every floating state to the parameter dtype, which for
        bf16 parameters destroys orthonormality), and are checked for shape, finiteness and orthonormality. The
        factored AdamW moments stay fp32 too.
        """
        self._check_checkpoint_layout(state_dict["param_groups"])
        running = [dict(group) for group in self.param_groups]  # this optimizer's (the config's) hyper-parameters
        saved_state = state_dict["state"]
        factors = {pid: {k: v for k, v in st.items() if k in _FP32_KEYS} for pid, st in saved_state.items()}
        stripped = dict(state_dict)
        stripped["state"] = {
            pid: {k: v for k, v in st.items() if k not in _FP32_KEYS} for pid, st in saved_state.items()
        }
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(stripped)
        for pid, p in zip(saved_ids, params):
            if factors.get(pid) and not set(factors[pid]) & set(_FACTOR_KEYS):  # factored AdamW moments only
                self.state[p].update({k: v.to(device=p.device, dtype=torch.float32) for k, v in factors[pid].items()})
            elif factors.get(pid):
                dtype = fm.factor_dtype(p.dtype)
                loaded = {k: v.to(device=p.device, dtype=dtype) for k, v in factors[pid].items()}
                if sharding.is_dtensor(p):  # a full (unsharded) checkpoint resumed under FSDP2: keep own rows of U
                    if not sharding.is_dtensor(loaded["U"]):
                        loaded["U"] = sharding.shard_rows_like(loaded["U"], p)
                    if any(key in loaded for key in _PENDING):
                        raise ValueError(
                            f"The checkpoint holds a pending gradient accumulation for {self._describe(p)}; resume "
                            "under FSDP2 from a checkpoint saved after an optimizer step."
                        )
                elif sharding.is_dtensor(loaded["U"]):
                    loaded["U"] = loaded["U"].full_tensor()
                self.state[p].update(loaded)
                self._check_loaded_factors(p)
        self._rng.load(state_dict.get(_RNG_KEY, {}))
        in_groups = [g[_SIDE_CLIP_KEY] for g in state_dict["param_groups"] if _SIDE_CLIP_KEY in g]
        saved = in_groups[0] if in_groups else state_dict.get(_SIDE_CLIP_KEY)  # top level: older checkpoints
        if saved is not None:
            self._side_clip_coef = float(saved)
        for group in self.param_groups:  # torch's load copies every saved group key: not a hyper-parameter
            group.pop(_SIDE_CLIP_KEY, None)
        self._keep_running_hyperparameters(running, state_dict["param_groups"])
        self.intake.adopt_state_sums()

    def _check_checkpoint_layout(self, saved_groups: list[dict[str, Any]]) -> None:
        """Say what changed when a checkpoint's groups do not match this optimizer's (optimizer, target, rank)."""
        if any("mofasgd" not in g for g in saved_groups):
            raise ValueError(
                "This optimizer state was not saved by MoFaSGD (its param groups have no `mofasgd` key): the "
                "checkpoint comes from another optimizer (e.g. `use_mfsgd: false`). Resume with the optimizer that "
                "saved it, or start MoFaSGD without resuming the optimizer state."
            )

        if routing_layout(saved_groups) != routing_layout(self.param_groups):

            def describe(groups: list[dict[str, Any]]) -> str:
                managed = sum(len(g["params"]) for g in groups if g["mofasgd"])
                others = sum(len(g["params"]) for g in groups if not g["mofasgd"])
                return f"{managed} MoFaSGD matrices and {others} AdamW tensors in {len(groups)} groups"

            raise ValueError(
                f"The checkpoint's optimizer holds {describe(saved_groups)}, this run routes "
                f"{describe(self.param_groups)}: the set of MoFaSGD matrices changed (`mfsgd_target`, frozen or "
                "added parameters, a different model). Resume with the routing that saved it, or start fresh."
            )
        for index, (saved, current) in enumerate(zip(saved_groups, self.param_groups)):
            saved_state, state = saved.get("adamw_state", "full"), current["adamw_state"]
            if not saved["mofasgd"] and saved_state != state:
                raise ValueError(
                    f"The checkpoint's AdamW-side state is {saved_state!r} (param group {index}), but this optimizer "
                    f"keeps {state!r} (`mfsgd_adamw_state`): the moments have other shapes. Resume with "
                    f"`mfsgd_adamw_state: {saved_state}`, or start a new run to change it."
                )
            if saved["mofasgd"] and saved["rank"] != current["rank"]:
                raise ValueError(
                    f"The checkpoint's MoFaSGD factors have rank {saved['rank']} (param group {index}), but this "
                    f"optimizer was built with rank {current['rank']} (`mfsgd_rank`). Resume with "
                    f"`mfsgd_rank: {saved['rank']}`, or start a new run to change the rank."
                )

    def _keep_running_hyperparameters(self, running: list[dict[str, Any]], saved_groups: list[dict[str, Any]]) -> None:
        """Give the loaded groups this optimizer's hyper-parameters back, and log each one the checkpoint had else.

        torch's load_state_dict restores the saved groups, so an edited config (lr, beta, nesterov, step form,
        weight decay...) would be printed at start-up and then ignored. Here the running values win; the shape keys
        (rank, mofasgd, adamw_state) were checked to be equal. Under a scheduler (``initial_lr`` on both sides) the
        base lr is this run's and the current lr keeps the checkpoint's position in the schedule:
        lr = saved lr * new initial_lr / old initial_lr.
        """
        changed = []
        for group, mine, saved in zip(self.param_groups, running, saved_groups):
            side = "MoFaSGD matrices" if mine["mofasgd"] else "AdamW side"
            for key, value in mine.items():
                if key in ("params", "param_names", "lr", "initial_lr", *_SHAPE_KEYS):
                    continue
                if key in saved and not _same_value(saved[key], value):
                    label = f"{key} ({side})" if key == "weight_decay" else key
                    changed.append(f"{label}: {_show(saved[key])} -> {_show(value)}")
                group[key] = value
            scheduled = "initial_lr" in mine and "initial_lr" in saved
            old, new = (saved["initial_lr"], mine["initial_lr"]) if scheduled else (saved["lr"], mine["lr"])
            if scheduled:
                group["lr"] = saved["lr"] * new / old if old and new != old else saved["lr"]
            else:  # no schedule, or only one side has one: this optimizer's lr as it stands
                group["lr"] = mine["lr"]
            group.pop("initial_lr", None)
            if "initial_lr" in mine:
                group["initial_lr"] = mine["initial_lr"]
            if not _same_value(old, new):
                changed.append(f"lr{' (base, initial_lr)' if scheduled else ''} ({side}): {old:g} -> {new:g}")
        if changed:
            logger.warning(
                "MoFaSGD resumes with this optimizer's hyper-parameters, not the checkpoint's (checkpoint -> now): %s",
                "; ".join(dict.fromkeys(changed)),
            )

    def _check_loaded_factors(self, p: torch.Tensor) -> None:
        state = self.state[p]
        group = self.param_groups[self._group_index[p]]
        if not group["mofasgd"]:
            raise ValueError(f"The checkpoint holds MoFaSGD factors for {self._describe(p)}, an AdamW parameter.")
        if not all(k in state for k in ("U", "S", "V", "step")):
            raise ValueError(f"Incomplete MoFaSGD state for {self._describe(p)}: it needs U, S, V and step.")
        *experts, m, n = p.shape  # a stack of E experts: every factor has a leading E
        r = fm.effective_rank(group["rank"], p.shape)
        expected = {"U": (m, r), "S": (r,), "V": (n, r), "GV": (m, r), "GtU": (n, r)}
        expected = {key: (*experts, *shape) for key, shape in expected.items()}
        for key, shape in expected.items():
            if key in state and tuple(state[key].shape) != shape:
                raise ValueError(
                    f"Corrupted MoFaSGD state for {self._describe(p)}: {key} has shape {tuple(state[key].shape)}, "
                    f"expected {shape} for rank {r}."
                )
        for key in _FACTOR_KEYS:
            if key in state and not self._all_finite(state[key]):
                raise ValueError(f"Corrupted MoFaSGD state for {self._describe(p)}: {key} has non-finite values.")
        tol = _ORTHONORMAL_TOL.get(state["U"].dtype, 1e-3)
        for key in ("U", "V"):
            factor = sharding.local(state[key])
            gram = sharding.sum_over(sharding.process_group(state[key]), factor.mT @ factor)
            error = (gram - torch.eye(r, dtype=factor.dtype, device=factor.device)).abs().max()
            if float(error) > tol:
                raise ValueError(
                    f"Corrupted MoFaSGD state for {self._describe(p)}: {key} is not orthonormal "
                    f"(max |{key}^T {key} - I| = {float(error):.3g} > {tol:g})."
                )

    @staticmethod
    def _all_finite(tensor: torch.Tensor) -> bool:
        """Whether every entry is finite, on every rank for a sharded DTensor (so all ranks raise or none)."""
        bad = (~torch.isfinite(sharding.local(tensor))).sum().to(torch.float32)
        return float(sharding.sum_over(sharding.process_group(tensor), bad.reshape(1))) == 0

    # ------------------------------------------------------------------ gradient intake
    def _init_factors(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor | None) -> dict[str, Any]:
        state = self.state[p]
        if "U" in state:
            return state
        dtype = fm.factor_dtype(p.dtype)
        rank = fm.effective_rank(group["rank"], p.shape)
        seed = p.shape[-2] * 7919 + p.shape[-1]  # the same on every data-parallel rank (and for every expert)
        weight = sharding.full_tensor(p.detach())  # FSDP2: every rank factors the whole W (one all-gather)
        if group["init"] != "gradient" and not bool(torch.isfinite(weight).all()):  # one read per matrix, once
            raise ValueError(
                f"{self._describe(p)} holds non-finite values (NaN or inf) before its first MoFaSGD step, so its "
                f"initial factors (init={group['init']!r}, the top singular vectors of the weight) cannot be "
                "computed. Check the model's weights (the checkpoint, or what ran before the optimizer)."
            )
        if group["init"] == "weight":
            U, S, V = fm.top_singular_triplets(weight.to(dtype), rank)
        elif group["init"] == "weight_randomized":
            U, S, V = fm.randomized_top_singular_triplets(weight, rank, dtype, seed=seed)
        else:
            source = grad if grad is not None else p.grad
            if source is None:  # data_parallel: a matrix this rank saw no gradient for at the first step
                raise ValueError(
                    f"init='gradient' initialises {self._describe(p)} from its first gradient, but this rank received "
                    "none (under data_parallel every rank must see one at the first step); use init='weight'."
                )
            # data_parallel: the first gradient is this rank's (left out of DDP); the factors are those of the
            # ranks' mean gradient, from averaged thin sketches (hooks run in the same order on every rank)
            average = self._distribution().average_sketches
            U, _, V = fm.randomized_top_singular_triplets(source.detach(), rank, dtype, seed=seed, average=average)
            S = torch.zeros(*p.shape[:-2], rank, dtype=dtype, device=p.device)
        del weight
        state["U"], state["S"], state["V"] = sharding.shard_rows_like(U, p), S, V
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    def _adopt_swapped_params(self) -> None:
        """Take over parameters put into the param groups after construction (accelerate's FSDP2 preparation).

        accelerate builds the optimizer on the plain parameters, then `fully_shard` replaces them with DTensors and
        accelerate swaps those into ``param_groups``: index them, check that they are row-sharded, and (in fused
        mode) hook them. The first step after the swap consumes the gradients no hook saw yet.
        """
        if all(p in self._group_index for g in self.param_groups for p in g["params"]):
            return
        self.intake.remove_hooks()  # the replaced parameters' hooks (their ids may be reused by the new ones)
        self._resolved = None  # sharded parameters may have come in
        self._group_index = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for group in self.param_groups:
            for p in group["params"]:
                if group["mofasgd"] and sharding.is_dtensor(p):
                    self._check_sharded(p, group)
                self._check_adamw_side_layout(p, group)
        self.intake.rebuild()

    @staticmethod
    def _fused_side_params(group: dict[str, Any]) -> list[torch.Tensor]:
        """The AdamW-side params updated in their hooks: the matrices (embeddings, LM head), whose gradients are big.

        The vectors (norms, biases) are updated at step(), with this step's clipping coefficient, in every mode;
        under DDP they stay in DDP's all-reduce, while the hooked matrices are averaged in their hooks (and must be
        left out of DDP, like the managed ones: ``data_parallel.ignore_managed_in_ddp``).
        """
        return [p for p in group["params"] if p.dim() == 2]

    def _at_accumulation_boundary(self) -> bool:
        """Whether the running backward completes the gradients the next step() consumes."""
        return self.accumulation_boundary() if self.accumulation_boundary is not None else not self.accumulating

    @torch.no_grad()
    def _adamw_side_update(self, p: torch.Tensor) -> None:
        """fused_adamw_side: update an AdamW-side parameter whose gradient is complete (from its hook), then free it.

        Its squared norm is recorded for grad_norm() (so the logged norm stays exact). Clipping cannot wait for
        the global norm here, so the gradient is scaled by the coefficient of the last clip_grad_norm_ call
        (the previous step's global norm); the managed matrices, stepped later, use this step's.
        """
        # left out of DDP's all-reduce: averaged here, in the same order on every rank
        self._distribution().average_gradient_(p.grad)
        self._side_norm_sq.append((_squared_norm(sharding.local(p.grad)).double(), sharding.is_dtensor(p)))
        if self._side_clip_coef < 1.0:
            p.grad.mul_(self._side_clip_coef)
        self._adamw_step(self.param_groups[self._group_index[p]], only=[p])
        p.grad = None

    def _absorb_unhooked_gradients(self) -> None:
        """Fused mode: consume managed `.grad`s no hook took (unfrozen later, set by hand), and hook new params."""
        self._adopt_swapped_params()
        if not self.fused:
            return
        self.intake.hook_adamw_side()
        self.intake.hook_matrices()
        for group in self.param_groups:
            if not group["mofasgd"]:
                continue
            for p in group["params"]:
                if p.grad is not None:
                    self._init_factors(p, group, p.grad)  # collective for FSDP2: same order on every rank
                    self.intake.matrix_gradient(p)

    @torch.no_grad()
    def _synchronize_pending(self) -> None:
        """Average pending projections over data-parallel ranks once per accumulation window.

        Every rank contributes every managed matrix (zeros where it saw no gradient) plus a flag, so the
        collective is the same on all ranks; a matrix no rank saw a gradient for stays without one.
        """
        self._absorb_unhooked_gradients()
        if self.intake.synced:
            return
        self._distribution().synchronize(self.intake)

    def _distribution(self) -> distribution.Distribution:
        """How this optimizer's ranks meet (one process, DDP replicas, FSDP2 row shards), resolved once.

        Resolved at first use and again after parameters were swapped in (accelerate's FSDP2 preparation).
        """
        if self._resolved is None:
            managed = [p for g in self.param_groups if g["mofasgd"] for p in g["params"]]
            self._resolved = distribution.resolve(managed, self.data_parallel, self._describe)
        return self._resolved

    def _dense_projections(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fused=False: (G V, G^T U) of the .grad the next step consumes, or None when p has no gradient."""
        if p.grad is None:
            return None
        state = self._init_factors(p, group, p.grad)
        return fm.project_gradient(p.grad, state["U"], state["V"])

    def _consumes_whole_gradient(self, group: dict[str, Any]) -> bool:
        return not self.fused and group["eta2"] > 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and, in fused mode, the pending projections of managed matrices."""
        super().zero_grad(set_to_none=set_to_none)
        self.intake.consumed()
        for state in self.state.values():  # sums a checkpoint loaded outside the intake's layout
            for key in _PENDING:
                state.pop(key, None)
        self._side_norm_sq = []
        self._side_nonfinite = []
        self._finite_norm = False

    # ------------------------------------------------------------------ norms and clipping
    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Exact global L2 norm of what the next step consumes, over every parameter of this optimizer.

        AdamW parameters contribute ||G||. A managed matrix contributes ||G_hat|| (its tangent projection,
        from the projections alone), or ||G|| when the step uses the whole gradient (fused=False, eta2 > 0).
        Summed on each device in fp64; the result is a 0-d tensor on the first parameter's device (no sync).
        FSDP2 shards add their shares of ||G||^2, ||G V||^2 and U^T G V over ranks in one small all-reduce.
        """
        self._synchronize_pending()
        totals: dict[torch.device, torch.Tensor] = {}
        shares: list[torch.Tensor] = []  # per-rank shares of sharded squared norms: summed over ranks
        blocks: list[torch.Tensor] = []  # per-rank shares of U^T G V of sharded matrices: summed, then squared
        for part, share in self._side_norm_sq:  # fused_adamw_side: gradients already consumed in their hooks
            if share:
                shares.append(part)
            else:
                totals[part.device] = totals.get(part.device, 0) + part
        for gi, group in enumerate(self.param_groups):
            if group["mofasgd"] and not self._consumes_whole_gradient(group):  # ||G_hat|| from the projections
                for bucket in self._buckets(gi):
                    if bucket.rows is not None:  # FSDP2: G^T U is already summed, the same on every rank
                        part = bucket.gtu.square().sum()
                        shares.append(bucket.gv.square().sum().double())
                        blocks.append((bucket.U.mT @ bucket.gv).double().flatten())
                    else:
                        part = fm.tangent_norm_sq(bucket.U, bucket.gv, bucket.gtu).clamp_min(0).sum()
                    totals[part.device] = totals.get(part.device, 0) + part.double()
                continue
            for p in group["params"]:
                part = self._consumed_norm_sq(p)
                if part is not None and sharding.is_dtensor(p):
                    shares.append(part.double())
                elif part is not None:
                    totals[part.device] = totals.get(part.device, 0) + part.double()
        first = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=first)
        for part in totals.values():
            total = total + part.to(first)
        if self._distribution().sharded:
            zero = torch.zeros(1, dtype=torch.float64, device=first)
            flat = torch.cat([sum((t.to(first) for t in shares), zero).reshape(1), *(b.to(first) for b in blocks)])
            self._distribution().sum_shares(flat)
            total = total + (flat[0] - flat[1:].square().sum()).clamp_min(0)
        return total.sqrt()

    @staticmethod
    def _consumed_norm_sq(p: torch.Tensor) -> torch.Tensor | None:
        """||G||^2 of a gradient the step uses whole (AdamW side; managed with fused=False and eta2 > 0), or None."""
        return None if p.grad is None else _squared_norm(sharding.local(p.grad))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
        """Scale every consumed gradient so the global norm is at most max_norm; return the norm before."""
        norm = self.grad_norm()
        if self.capturable:
            self._clip_on_device(norm, max_norm, eps)
            return norm
        if self._nonfinite is None:
            value = float(norm)  # the one host-device sync of clipping
        else:  # also read the last step's skip count, in the same sync
            value, skipped = torch.stack([norm, self._nonfinite.to(norm)]).tolist()
            self._report_nonfinite(skipped)
        self._finite_norm = math.isfinite(value)  # every gradient finite: step() needs no check of its own
        coef = float(max_norm) / (value + eps)
        if self._finite_norm:  # a non-finite norm skips the step; it must not scale the next hooked updates
            self._side_clip_coef = min(coef, 1.0)  # fused_adamw_side: what the next step's hooked updates use
        if coef < 1.0:
            consumed = self._consumed_tensors()  # fused mode: every pending sum, scaled once in its bucket's buffer
            plain = [t for t in consumed if not sharding.is_dtensor(t)]
            if plain:
                torch._foreach_mul_(plain, coef)
            for tensor in consumed:
                if sharding.is_dtensor(tensor):
                    tensor.mul_(coef)
        return norm

    def _consumed_tensors(self) -> list[torch.Tensor]:
        """Every gradient the next step consumes: the ``.grad``s held, and each bucket's pending-sum buffers."""
        consumed = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        return consumed + self.intake.buffers()

    def _clip_on_device(self, norm: torch.Tensor, max_norm: float, eps: float) -> None:
        """capturable: scale by min(1, max_norm / (norm + eps)) as a device scalar, always (like torch's clipping).

        A non-finite norm makes the coefficient non-finite or zero, and the step's own device check skips the step.
        """
        coef = (float(max_norm) / (norm + eps)).clamp_max(1.0).to(torch.float32)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for tensor in self._consumed_tensors():
            by_device.setdefault(tensor.device, []).append(tensor)
        for device, tensors in by_device.items():
            torch._foreach_mul_(tensors, coef.to(device))

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step for every group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._synchronize_pending()
        if self.capturable:
            self._load_learning_rates()
            self._step_on_device()
            return loss
        finite_norm, self._finite_norm = self._finite_norm, False
        if not finite_norm and self._skip_nonfinite_step():
            self._side_norm_sq, self._side_nonfinite = [], []
            return loss
        finite = []
        for gi, group in enumerate(self.param_groups):
            if group["mofasgd"]:
                finite += self._matrix_steps(gi)
            else:
                self._adamw_step(group)
        self._count_nonfinite(finite)
        self._side_norm_sq, self._side_nonfinite = [], []
        return loss

    def _step_on_device(self) -> None:
        """capturable: the whole step with nothing read on the host; a non-finite gradient skips it on the device.

        Every consumed gradient is summed once (as in :meth:`_skip_nonfinite_step`); while any sum is not finite, no
        weight, factor, AdamW moment or step counter changes. The skips are counted on the device and logged by
        :meth:`pop_diagnostics` (a logging step reads the host anyway).
        """
        views = [view for gi in range(len(self.param_groups)) for view in self.intake.pending(gi)]
        sums = [view.gv.sum() + view.gtu.sum() for view in views]
        sums += [p.grad.sum() for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not sums:
            return
        device = sums[0].device
        allowed = torch.isfinite(torch.stack([t.to(device, torch.float32) for t in sums]).sum())
        # every bucket's math first, so that all their cores go through one batched sync-free SVD per core shape
        work = [(gi, b) for gi, g in enumerate(self.param_groups) if g["mofasgd"] for b in self._buckets(gi)]
        inputs = [self._bucket_inputs(self.param_groups[gi], bucket, allowed) for gi, bucket in work]
        outcomes = bucket_directions(inputs)
        finite = []
        for gi, group in enumerate(self.param_groups):  # then the updates, in group order (the rounding bits' order)
            if not group["mofasgd"]:
                self._adamw_step(group, allowed=allowed)
                continue
            for index, (owner, bucket) in enumerate(work):
                if owner == gi:
                    finite.append(self._bucket_step(group, bucket, allowed, outcomes[index]))
            self.intake.consumed(gi)
        self._count_nonfinite([flags | ~allowed for flags in finite])  # a whole-step skip is counted apart
        if self._skipped_steps is None:  # one counter, added to in place (a replayed graph writes the same memory)
            self._skipped_steps = torch.zeros((), dtype=torch.float32, device=device)
        self._skipped_steps.add_((~allowed).to(torch.float32))
        self._side_norm_sq, self._side_nonfinite = [], []

    def _skip_nonfinite_step(self) -> bool:
        """Skip the whole step when any gradient it would consume is not finite, as AMP's grad scaler does.

        Decided once per step, for both sides together: one sum per AdamW-side gradient and per stack of pending
        projections (their sums are finite when every entry is), the shares of FSDP2 shards summed over ranks
        (DDP ranks hold the same averaged values), then one host read. A skipped step changes no weight, factor,
        AdamW moment or step counter; its pending projections are dropped like a step's. ``clip_grad_norm_``
        spares the check when it has just read a finite norm (a non-finite gradient makes the norm non-finite).
        Returns whether the step was skipped.
        """
        tensors, sums = [], []
        for gi, group in enumerate(self.param_groups):
            if group["mofasgd"] and self.fused:  # the intake's pending sums as they are: no factors stacked
                for view in self.intake.pending(gi):
                    per_entry = view.gv.sum((-2, -1)) + view.gtu.sum((-2, -1))  # an expert stack: E entries
                    tensors += view.params
                    sums.append(per_entry.reshape(len(view.params), -1).sum(-1))
                continue
            for p in group["params"]:
                if p.grad is not None:
                    tensors.append(p)
                    sums.append(sharding.local(p.grad).sum().reshape(1))
        if not sums and not self.fused_adamw_side:
            return False
        device = sums[0].device if sums else torch.device("cpu")
        if self.fused_adamw_side:  # one entry (the same length on every rank): a hooked gradient was not finite
            tensors.append(None)
            sums.append(torch.full((1,), torch.nan if self._side_nonfinite else 0.0, device=device))
        bad = (~torch.isfinite(torch.cat([t.to(device, torch.float32) for t in sums]))).to(torch.float32)
        self._distribution().sum_shares(bad)  # a shard's non-finite rows skip the step on every rank
        if not float(bad.sum()):
            return False
        flags = bad.tolist()
        named = [self._describe(p) for p, flag in zip(tensors, flags) if flag and p is not None]
        if self.fused_adamw_side and flags[-1]:  # the hooked ones, named where this rank saw them
            here = [self._describe(p) for p in self._side_nonfinite]
            named += here or ["an AdamW-side matrix updated in its gradient hook on another rank"]
        shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        hooked = (
            " The AdamW-side matrices updated in their gradient hooks (fused_adamw_side) kept the updates of their "
            "finite gradients; the non-finite ones were not applied."
            if self.fused_adamw_side
            else ""
        )
        logger.warning(
            "MoFaSGD skipped this optimizer step: non-finite gradient in %d %s (%s). No weight, factor, AdamW moment "
            "or step counter changed (like AMP's scaler skipping a step).%s Check the loss scale, learning rate or "
            "data.",
            len(named),
            "tensor" if len(named) == 1 else "tensors",
            shown,
            hooked,
        )
        self.intake.consumed()
        return True

    @staticmethod
    def current_beta(group: dict[str, Any], step: int) -> float:
        """Return beta for the step after `step` completed ones: linear warm-up when beta_warmup_steps > 0."""
        return _warmed_beta(group, step)

    def _rounding_generator(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Generator | None:
        """The generator for stochastic rounding of `p`'s update, or None for plain in-place arithmetic."""
        enabled = group["stochastic_rounding"]
        if enabled is False or not supports_stochastic_rounding(p.dtype):
            return None
        return self._rng.get(p.device)

    def _buckets(self, group_index: int) -> list[_Bucket]:
        """The managed matrices of a group that hold a gradient, in buckets of one (shape, dtype, device, rank).

        Matrices of a bucket are stepped together: their panels go through one batched QR per side and their cores
        through one batched SVD, so the solver calls per step scale with the number of distinct shapes, not of
        matrices. In fused mode the projections are the intake's pending buffers; with fused=False they are formed
        here from each ``.grad``.
        """
        group = self.param_groups[group_index]
        if self.fused:
            pending = [(view.params, view.gv, view.gtu) for view in self.intake.pending(group_index)]
        else:
            pending = self._dense_buckets(group)
        buckets = []
        for params, gv, gtu in pending:
            states = [self.state[p] for p in params]
            experts = experts_of(params[0])  # a bucket holds matrices, or stacks of as many experts each
            U = _stacked([sharding.local(st["U"]) for st in states], experts)
            S, V = (_stacked([st[key] for st in states], experts) for key in ("S", "V"))
            rows = self._distribution().rows(params[0])
            matrices, entry_states = params, states
            if experts is not None:  # every expert is an entry, updated in place through its slice of the stack
                matrices = [matrix for p in params for matrix in p.unbind(0)]
                entry_states = [st for st in states for _ in range(experts)]
            buckets.append(_Bucket(matrices, entry_states, U, S, V, gv, gtu, rows))
        return buckets

    def _dense_buckets(self, group: dict[str, Any]) -> list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """fused=False: the matrices holding a .grad, grouped by (shape, dtype, device, rank), projections stacked."""
        members: dict[tuple, list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]] = {}
        for p in group["params"]:
            projections = self._dense_projections(p, group)
            if projections is None:
                continue
            U = self.state[p]["U"]
            members.setdefault((tuple(p.shape), p.dtype, p.device, U.dtype, U.shape[-1]), []).append((p, projections))
        buckets = []
        for items in members.values():
            params, experts = [p for p, _ in items], experts_of(items[0][0])
            buckets.append((params, *(_stacked([proj[k] for _, proj in items], experts) for k in (0, 1))))
        return buckets

    def _matrix_steps(self, group_index: int, allowed: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Step every managed matrix of a group that has a gradient, one batched step per bucket.

        `allowed` (capturable): a device flag, false when the whole step is skipped. Returns each bucket's
        per-matrix finiteness flags (device tensors, counted once per step).
        """
        group = self.param_groups[group_index]
        finite = [self._bucket_step(group, bucket, allowed) for bucket in self._buckets(group_index)]
        self.intake.consumed(group_index)
        return finite

    def _bucket_inputs(self, group: dict[str, Any], bucket: _Bucket, allowed: torch.Tensor | None) -> BucketInputs:
        """What the functional core needs for one bucket: its stacked tensors, beta and the group's settings."""
        floor = group["min_gradient_support"]
        settings = DirectionSettings(
            rank=bucket.U.shape[-1],
            nesterov=group["nesterov"],
            eps=group["eps"],
            max_value=group["max_value"],
            use_ones_for_nonzero_s=group["use_ones_for_nonzero_s"],
            min_gradient_support=floor,
            want_support=floor > 0 or self._diagnostics is not None,
            sync_free=self.capturable,
        )
        beta = self._bucket_beta(group, bucket.states, bucket.U)
        return BucketInputs(bucket.U, bucket.S, bucket.V, bucket.gv, bucket.gtu, beta, settings, bucket.rows, allowed)

    def _bucket_step(
        self,
        group: dict[str, Any],
        bucket: _Bucket,
        allowed: torch.Tensor | None = None,
        outcome: BucketOutcome | None = None,
    ) -> torch.Tensor:
        """One MoFaSGD step for the matrices of one bucket (FSDP2 shards of one local shape with `bucket.rows`).

        The math is :func:`~mofasgd.bucket_step.bucket_direction` (pure, batched); each weight is then updated in
        place by :func:`~mofasgd.bucket_step.update_matrix_`, so the extra transient memory is that of the stacked
        factors and projections, O(B (m + n) r). A matrix whose projections are not finite (every matrix when the
        device flag `allowed` is false) keeps its factors and weight, decided on the device; its step counter still
        advances. Diagnostics read the math's outputs around the weight update. Returns the per-matrix flags.
        """
        params, U, V = bucket.params, bucket.U, bucket.V
        if outcome is None:
            outcome = bucket_direction(self._bucket_inputs(group, bucket, allowed))
        floor = group["min_gradient_support"]
        finite, direction, scale = outcome.finite, outcome.direction, outcome.scale
        if self._diagnostics is not None and outcome.support is not None:  # the strongest direction's support
            stepping = direction.S[:, 0] > group["eps"]
            strongest = torch.where(stepping, outcome.support[:, 0], torch.inf)
            self._diagnostics["support" if floor > 0 else "unguarded_support"].append(strongest)
        lr = group["lr"]
        generator = self._rounding_generator(params[0], group)  # a bucket shares one device and dtype
        dtype = torch.float32 if generator is not None else params[0].dtype  # the update's arithmetic
        compiled = generator is not None and self.rounding_kernel.compiled(params[0].device)
        alpha: float | torch.Tensor = -lr * group["eta1"]
        if allowed is not None:  # capturable: the learning rate is read from its device tensor, folded into U
            lr = self._lr_tensor(group, U.device, U.dtype)
            scale, alpha = scale * (-lr * group["eta1"]), 1.0
        # per-matrix views taken once per bucket (one op each, instead of an indexing op per matrix and tensor)
        lefts = (direction.U * scale.unsqueeze(-2)).to(dtype).unbind(0)
        rights_t = direction.V.mT.to(dtype).unbind(0)
        decays = self._bucket_decay(group, finite, dtype, lr)
        whole_gradient = self._consumes_whole_gradient(group)
        new = outcome.factors
        for i, param in enumerate(params):
            p = sharding.local(param)  # FSDP2: this rank's rows, updated in place
            complement = None
            if whole_gradient:
                basis = (new.U[i], new.V[i]) if group["use_current_projection"] else (U[i], V[i])
                p.grad = torch.where(finite[i], p.grad, 0)
                complement = (p.grad, *basis, -lr * group["eta2"])
            before = None
            if self._diagnostics is not None:
                one = fm.LowRank(direction.U[i], direction.S[i], direction.V[i])
                before = self._diagnostics_before(p, one, outcome.scale[i], group["lr"], group)
            decay = None if decays is None else decays[i]
            update_matrix_(p, lefts[i], rights_t[i], alpha, decay, complement, generator, compiled)
            self._diagnostics_after(p, before)
        self._store_factors(bucket, new, allowed)
        return finite

    def _bucket_beta(
        self, group: dict[str, Any], states: list[dict[str, Any]], like: torch.Tensor
    ) -> float | torch.Tensor:
        """The beta of each matrix of a bucket: one number, or B values while beta warms up (each its own count)."""
        if group["beta_warmup_steps"] <= 0:
            return group["beta"]
        if self.capturable:  # from the step counters as tensors: nothing read on the host
            return _warmed_beta(group, torch.stack([st["step"] for st in states]).to(like.device, like.dtype))
        betas = [self.current_beta(group, int(st["step"])) for st in states]  # CPU counters: no device sync
        return betas[0] if len(set(betas)) == 1 else torch.tensor(betas, dtype=like.dtype, device=like.device)

    @staticmethod
    def _store_factors(bucket: _Bucket, new: fm.LowRank, allowed: torch.Tensor | None = None) -> None:
        """Keep each managed tensor's new factors as slices of the batched results and count its step.

        A matrix keeps its entry; a stack of E experts (whose state is that of E consecutive entries) keeps those
        E entries (E x m x r, ...), so the next step stacks them back as views of one tensor. With `allowed`
        (capturable) the counters live on the factors' device and advance only where the step was allowed.
        """
        states = list({id(state): state for state in bucket.states}.values())
        stacked = (bucket.U, bucket.S, bucket.V)
        if allowed is not None and all(_shares_storage(t, states[0][k]) for t, k in zip(stacked, "USV")):
            # capturable: the stacks are views of the factors themselves, kept at fixed addresses (a replayed
            # graph reads and writes the same memory every step)
            for stack, fresh in zip(stacked, new):
                stack.copy_(fresh)
            MoFaSGD._count_step(states, allowed)
            return
        stacks = states[0]["U"].dim() == 3
        pieces = [t.split(len(bucket.states) // len(states)) if stacks else t.unbind(0) for t in new]
        for state, u, s, v in zip(states, *pieces):
            state["U"] = u if bucket.rows is None else sharding.wrap_rows_like(u, state["U"])
            state["S"], state["V"] = s, v
        MoFaSGD._count_step(states, allowed)

    @staticmethod
    def _count_step(states: list[dict[str, Any]], allowed: torch.Tensor | None) -> None:
        """Advance the step counters (capturable: on the factors' device, and only where the step was allowed)."""
        if allowed is None:
            torch._foreach_add_([state["step"] for state in states], 1.0)
            return
        for state in states:  # moved once (warm-up): a CPU counter would be a host copy at every step
            if state["step"].device != allowed.device:
                state["step"] = state["step"].to(allowed.device)
        torch._foreach_add_([state["step"] for state in states], allowed.to(torch.float32))

    @staticmethod
    def _bucket_decay(
        group: dict[str, Any], finite: torch.Tensor, dtype: torch.dtype, lr: float | torch.Tensor
    ) -> tuple[torch.Tensor, ...] | None:
        """Per matrix, the weight-decay factor 1 - lr wd as a `dtype` device scalar (1 if skipped), or None."""
        if group["weight_decay"] == 0:
            return None
        if torch.is_tensor(lr):  # capturable: from the learning rate's device tensor
            return torch.where(finite, 1.0 - lr * group["weight_decay"], 1.0).to(dtype).unbind(0)
        decay = torch.full_like(finite, 1.0 - lr * group["weight_decay"], dtype=dtype)
        return decay.masked_fill_(~finite, 1.0).unbind(0)

    def _lr_tensor(self, group: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """capturable: the group's learning rate as a 0-d tensor on `device` (filled by :meth:`step`).

        fp64 for fp64 arithmetic (an fp32 learning rate would be off by 1e-8 relative), else fp32.
        """
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (self.param_groups.index(group), device, dtype)
        if key not in self._lrs:
            self._lrs[key] = torch.full((), float(group["lr"]), dtype=dtype, device=device)
        return self._lrs[key]

    def _load_learning_rates(self) -> None:
        """capturable: write each group's current learning rate (a scheduler may have changed it) into its tensors.

        The writes are fills from a Python number (no host read); a captured step must run them before each replay.
        """
        for (index, _, _), tensor in self._lrs.items():
            tensor.fill_(float(self.param_groups[index]["lr"]))

    def _count_nonfinite(self, finite: list[torch.Tensor]) -> None:
        """Add the matrices this step skipped for non-finite gradients to a device counter (read at the next sync).

        `finite` holds each bucket's per-matrix flags. On the CPU the count is reported at once.
        """
        if not finite:
            return
        device = finite[0].device
        flags = torch.cat([f.to(device) for f in finite]) if len(finite) > 1 else finite[0]
        skipped = flags.numel() - flags.sum()
        if self.capturable:  # one counter, added to in place (a replayed graph writes the same memory)
            if self._nonfinite is None:
                self._nonfinite = torch.zeros((), dtype=skipped.dtype, device=device)
            self._nonfinite.add_(skipped)
        else:
            self._nonfinite = (
                skipped if self._nonfinite is None else self._nonfinite + skipped.to(self._nonfinite.device)
            )
        self._nonfinite_total += flags.numel()
        if device.type == "cpu" and not self.capturable:
            self._report_nonfinite()

    def _report_nonfinite(self, skipped: float | None = None) -> None:
        """Log how many matrix updates (and, capturable, whole steps) were skipped for non-finite gradients."""
        if self._skipped_steps is not None:
            steps = int(self._skipped_steps)
            self._skipped_steps.zero_()
            if steps:
                logger.warning(
                    "MoFaSGD skipped %d optimizer %s since the last report: a gradient was not finite. No weight, "
                    "factor, AdamW moment or step counter changed in %s (like AMP's scaler skipping a step). Check "
                    "the loss scale, learning rate or data.",
                    steps,
                    "step" if steps == 1 else "steps",
                    "it" if steps == 1 else "them",
                )
        if self._nonfinite is None:
            return
        count = int(self._nonfinite if skipped is None else skipped)
        if count:
            logger.warning(
                "MoFaSGD skipped the update of %d of %d matrices whose gradient was not finite (factors and weights "
                "kept; check the loss scale, learning rate or data).",
                count,
                self._nonfinite_total,
            )
        if self.capturable:  # the counter stays where it is
            self._nonfinite.zero_()
            self._nonfinite_total = 0
        else:
            self._nonfinite, self._nonfinite_total = None, 0

    def _adamw_step(
        self, group: dict[str, Any], only: list[torch.Tensor] | None = None, allowed: torch.Tensor | None = None
    ) -> None:
        """AdamW (or the factored variant) for the AdamW-side params of `group` that hold a gradient (or `only`).

        `allowed` (capturable): a device flag; while it is false nothing changes (torch's fused AdamW with
        ``found_inf``, or the masked fp32 update), and the step counters live on the parameters' devices.
        """
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        beta1, beta2 = group["adam_betas"]
        for p in group["params"] if only is None else only:
            if p.grad is None or (only is not None and not self._hooked_gradient_finite(p)):
                continue
            state = self.state[p]
            generator = self._rounding_generator(p, group)
            if group["adamw_state"] != "full" and p.dim() == 2:
                self._factored_step(p, group, state, generator)
                continue
            if "exp_avg" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if allowed is not None and state["step"].device != p.device:  # once: a resumed CPU counter
                state["step"] = state["step"].to(p.device)
            # FSDP2: the moments are DTensors sharded like p (so checkpoints shard them); the math is elementwise,
            # so it runs on the local shards
            exp_avg, exp_avg_sq = sharding.local(state["exp_avg"]), sharding.local(state["exp_avg_sq"])
            settings = AdamSettings.of(group)
            if allowed is not None:  # capturable: the learning rate from its device tensor
                settings = settings._replace(lr=self._lr_tensor(group, p.device, torch.float32))
            if generator is not None:
                state["step"] += 1 if allowed is None else allowed.to(torch.float32)
                update = adamw_update_fp32_
                if self.rounding_kernel.compiled(p.device) and exp_avg.dtype == exp_avg_sq.dtype == torch.bfloat16:
                    update = adamw_update_  # the same step in one compiled pass, bits hashed
                update(
                    sharding.local(p),
                    sharding.local(p.grad),
                    exp_avg,
                    exp_avg_sq,
                    int(state["step"].item()) if allowed is None else state["step"],
                    settings,
                    generator,
                    allowed,
                )
                continue
            params.append(sharding.local(p))
            grads.append(sharding.local(p.grad))
            exp_avgs.append(exp_avg)
            exp_avg_sqs.append(exp_avg_sq)
            steps.append(state["step"])
        if not params:
            return
        fused_kernel = allowed is not None or params[0].device.type == "cpu"
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
            lr=group["lr"] if allowed is None else self._lr_tensor(group, params[0].device, params[0].dtype),
            weight_decay=group["weight_decay"],
            eps=group["adam_eps"],
            maximize=False,
            # the fused kernel on the CPU (one pass per tensor, no temporaries: 0.30 against foreach's 0.76 ms on
            # the small benchmark model's side, within 1 ulp of torch's default AdamW) and when capturable (its
            # found_inf skips the update on the device); elsewhere foreach, torch's default on CUDA
            foreach=None if fused_kernel else True,
            fused=True if fused_kernel else None,
            found_inf=None if allowed is None else (~allowed).to(torch.float32),
        )

    def _hooked_gradient_finite(self, p: torch.Tensor) -> bool:
        """fused_adamw_side: whether a gradient updated in its hook is finite; a non-finite one is not applied.

        The hooked update happens during backward, before step() can decide for the whole step, so it is checked
        alone (one host read per hooked matrix and step; the factored and stochastically rounded updates read their
        step count anyway) and step() then skips the rest of the step.
        Under FSDP2 this is a shard's own verdict: finite rows of other ranks are still applied.
        """
        if bool(torch.isfinite(sharding.local(p.grad).sum())):
            return True
        self._side_nonfinite.append(p)
        return False

    @staticmethod
    def _factored_step(
        p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], generator: torch.Generator | None
    ) -> None:
        """One AdamW-side step of a matrix with the factored second moment (adamw_side.factored_adam_update_)."""
        if "exp_avg_sq_row" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if group["adamw_state"] == "factored":
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq_row"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)
        state["step"] += 1
        moments = (state.get("exp_avg"), state["exp_avg_sq_row"], state["exp_avg_sq_col"])
        factored_adam_update_(p, p.grad, *moments, int(state["step"].item()), AdamSettings.of(group), generator)

    # ------------------------------------------------------------------ diagnostics
    def request_diagnostics(self) -> None:
        """Collect update statistics during the next step(); read them with :meth:`pop_diagnostics`.

        Costs one O(m n r) pass per matrix, so it is meant for logging steps only.
        """
        keys = ("update_sq", "weight_sq", "applied", "intended", "along", "S", "alive", "support", "unguarded_support")
        self._diagnostics = {key: [] for key in keys}

    def _diagnostics_before(
        self, p: torch.Tensor, direction: fm.LowRank, scale: torch.Tensor, lr: float, group: dict[str, Any]
    ) -> tuple[torch.Tensor, ...] | None:
        if self._diagnostics is None:
            return None
        diag = self._diagnostics
        U, V, scale = direction.U.float(), direction.V.float(), scale.float()
        diag["S"].append(direction.S.float())
        diag["alive"].append((direction.S > group["eps"]).float())
        scale_sq = scale.square().sum()
        diag["update_sq"].append((lr * group["eta1"]) ** 2 * scale_sq)
        weight = p.detach().float()
        diag["weight_sq"].append(weight.square().sum())
        # <W, D> with D = U diag(s_hat) V^T, through U^T W V (r x r): intended change along D. Under FSDP2 U and W
        # are this rank's rows, so `along` and the weight terms are shares summed over ranks in pop_diagnostics.
        along = (torch.diagonal(U.T @ weight @ V) * scale).sum()
        diag["intended"].append(-(lr * group["eta1"]) * scale_sq)
        diag["along"].append(-lr * group["weight_decay"] * along)
        return U, V, scale, along

    def _diagnostics_after(self, p: torch.Tensor, before: tuple | None) -> None:
        if before is None:
            return
        U, V, scale, along_before = before
        along_after = (torch.diagonal(U.T @ p.detach().float() @ V) * scale).sum()
        self._diagnostics["applied"].append(along_after - along_before)

    def pop_diagnostics(self) -> dict[str, float]:
        """Statistics of the last step collected after :meth:`request_diagnostics` (one device sync), then reset.

        ``update_rms_ratio``: ||lr eta1 U diag(s_hat) V^T|| / ||W|| over all managed matrices; ``s_median``,
        ``s_max``: of the step's singular values; ``alive_fraction``: share of directions with S > eps;
        ``applied_fraction``: the weight change along the intended step over the intended change (1 in fp32;
        for bf16 weights it shows how much rounding kept); ``gradient_support`` (1/S form, not on FSDP2 shards):
        the smallest ||G_hat|| / ((1 - beta) S_max) over the matrices, about 1 or more while the gradient sustains
        the momentum, near 0 when it has vanished (then the 1/S step grows; warned once per run, see
        ``min_gradient_support``).
        """
        diag, self._diagnostics = self._diagnostics, None
        if self.capturable:  # the skip counts wait on the device for a step that reads the host anyway
            self._report_nonfinite()
        if not diag or not diag["S"]:
            return {}
        s = torch.cat(diag["S"])
        # shares of the sharded (FSDP2) rows: summed over ranks; the other terms are the same on every rank
        shares = torch.stack([torch.stack(diag[key]).sum() for key in ("weight_sq", "applied", "along")])
        self._distribution().sum_shares(shares)
        weight_sq, applied, along = shares
        intended = torch.stack(diag["intended"]).sum() + along
        stats = [
            (torch.stack(diag["update_sq"]).sum() / weight_sq.clamp_min(1e-30)).sqrt(),
            s.median(),
            s.max(),
            torch.cat(diag["alive"]).mean(),
            applied / intended,
        ]
        names = ["update_rms_ratio", "s_median", "s_max", "alive_fraction", "applied_fraction"]
        support = [t.to(s.device) for t in diag["support"] + diag["unguarded_support"]]
        if support:  # the 1/S form's gradient support, and how many unguarded matrices it shows starved
            unguarded = [t.to(s.device) for t in diag["unguarded_support"]]
            starved = (torch.cat(unguarded) < _VANISHING_SUPPORT).sum() if unguarded else s.new_zeros(())
            stats += [torch.cat(support).min(), starved.to(s.dtype)]
            names += ["gradient_support", "starved"]
        out = dict(zip(names, torch.stack(stats).tolist()))
        starved = int(out.pop("starved", 0))
        if starved and not self._warned_vanishing:
            self._warned_vanishing = True
            logger.warning(
                "MoFaSGD: the gradient of %d managed matrices has all but vanished (||G_hat|| < %g (1 - beta) S: "
                "their momentum only decays), and the 1/S step grows as S shrinks (update_rms_ratio %.3g). Check "
                "the data and labels (a batch with almost every label masked gives a zero gradient). To bound the "
                "step, set min_gradient_support (`mfsgd_min_gradient_support`, e.g. 0.01) or use the spectral step "
                "(`mfsgd_use_ones_for_nonzero_s: true`); docs/algorithm.md section 2. Warned once per run.",
                starved,
                _VANISHING_SUPPORT,
                out["update_rms_ratio"],
            )
        return out

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
