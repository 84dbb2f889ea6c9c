"""Projected linear backward: an ``nn.Linear`` whose managed weight never receives a gradient.

For y = x W^T (W m x n, x T x n, dY T x m) the weight gradient is G = dY^T X, and MoFaSGD needs only
G V = dY^T (X V) and G^T U = X^T (dY U): four thin products, 2 T (m + n) r FLOPs instead of the 2 T m n of the
weight-gradient GEMM, and no m x n tensor. :func:`attach` swaps the forward of the Linear modules whose weight an
optimizer manages for one through :class:`_ProjectedLinear`, whose backward returns dX (and the bias gradient) as
usual and hands X and dY to the optimizer's :class:`~mofasgd.intake.GradientIntake` instead of returning dW.

Where the factors do not exist yet and can only come from a dense gradient (``init='gradient'``'s first step), the
intake forms dW = dY^T X once, initialises the factors from it and projects it. A weight also used outside its
Linear gets that use's gradient through its post-accumulate-grad hook, so both contributions are counted. Under
``create_graph=True`` dX is formed from the weight itself, so higher-order terms reach W through that hook too. A
backward that accumulates into no leaf (``torch.autograd.grad``, ``backward(inputs=...)``) adds nothing, as it
would leave ``.grad`` alone.
"""

from __future__ import annotations

import re
import types
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mofasgd.intake import GradientIntake

PROJECTED = "projected"
HOOK = "hook"


class _ProjectedLinear(torch.autograd.Function):
    """F.linear whose backward sends (X, dY) to the intake instead of forming dW.

    The weight enters detached, so autograd has no edge to it: its AccumulateGrad never runs and its
    post-accumulate-grad hooks never fire. The intake's ``anchor`` (an empty leaf that requires grad) keeps the
    output in the graph when neither the input nor the bias needs a gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, intake_ref, weight_ref):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # what autocast would run: F.linear in its dtype, inputs cast
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast(device, enabled=False):
                out = F.linear(x, weight, bias)
        else:
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.intake_ref, ctx.weight_ref = intake_ref, weight_ref
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        param = ctx.weight_ref()
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled() and param is not None:  # create_graph: keep dX differentiable in W
                grad_x = grad_out @ param.to(weight.dtype)
            else:
                grad_x = grad_out @ weight
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        intake = ctx.intake_ref()
        if intake is not None and param is not None and intake.accumulates():
            with torch.no_grad():
                intake.add_linear(param, x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1]))
        return grad_x, None, grad_bias, None, None, None


def _projected_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward through the projected backward while its weight is a managed parameter of a live intake."""
    intake_ref = self.__dict__.get("_mofasgd_intake")
    intake = intake_ref() if intake_ref is not None else None
    weight = self.weight
    if intake is None or intake.slot(weight) is None or not torch.is_grad_enabled() or not weight.requires_grad:
        return F.linear(input, weight, self.bias)
    return _ProjectedLinear.apply(input, weight.detach(), self.bias, intake.anchor, intake_ref, weakref.ref(weight))


@dataclass
class Attachment:
    """What :func:`attach` did: per managed matrix (by name), the path its gradient takes and, for hooks, why."""

    paths: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (PROJECTED | HOOK, reason)
    modules: list[weakref.ref] = field(default_factory=list)
    intake_ref: weakref.ref | None = None

    def projected(self) -> list[str]:
        """Names of the matrices on the projected path."""
        return [name for name, (path, _) in self.paths.items() if path == PROJECTED]

    def table(self) -> str:
        """One line per path and reason, layers folded like the routing table (``layers.*.``)."""
        folded: dict[tuple[str, str, str], int] = {}
        for name, (path, reason) in self.paths.items():
            key = (re.sub(r"\.\d+\.", ".*.", name), path, reason)
            folded[key] = folded.get(key, 0) + 1
        rows = [("matrix", "count", "gradient path")]
        for (name, path, reason), count in folded.items():
            rows.append((name, str(count), path + (f" ({reason})" if reason else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}" for r in rows]
        count = len(self.projected())
        lines.append(f"Projected backward: {count} of {len(self.paths)} MoFaSGD matrices (no weight gradient formed).")
        return "\n".join(lines)

    def detach(self) -> None:
        """Give every patched module its own forward back (unless a newer optimizer has attached it since)."""
        for ref in self.modules:
            module = ref()
            if module is not None and module.__dict__.get("_mofasgd_intake") is self.intake_ref:
                module.__dict__.pop("forward", None)
                module.__dict__.pop("_mofasgd_intake", None)
        self.modules.clear()


# torch's own test of whether the running backward executes a node (torch.utils.checkpoint relies on it too)
_ENGINE_QUERY = "_will_engine_execute_node"


def _why_not(module: nn.Module) -> str | None:
    """Why a Linear module holding a managed weight cannot take the projected forward, or None when it can."""
    if type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} has its own forward"
    wrapped = module.__dict__.get("forward")
    if wrapped is not None and getattr(wrapped, "__func__", None) is not _projected_forward:  # ours: taken over
        return "its forward is already wrapped"
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks"
    return None


def attach(
    model: nn.Module,
    intake: GradientIntake,
    names: dict[int, str],
    refusal: str | None,
    notes: dict[int, str] | None = None,
) -> Attachment:
    """Route the managed weights of `model`'s Linear modules through the projected backward.

    Args:
        model: the model whose modules are patched (in place; :meth:`Attachment.detach` undoes it).
        intake: the optimizer's gradient intake, which receives the projections.
        names: id(parameter) -> name, for the managed matrices to report on.
        refusal: why no matrix can take the projected path (an optimizer setting), or None.
        notes: id(parameter) -> a remark shown beside a projected matrix (e.g. its first step is dense).
    """
    ref = weakref.ref(intake)
    attachment = Attachment(intake_ref=ref)
    if refusal is None and not hasattr(torch._C, _ENGINE_QUERY):
        refusal = f"this torch has no torch._C.{_ENGINE_QUERY}"
    linear_of: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and id(weight) in names:
            linear_of.setdefault(id(weight), []).append(module)
    for pid, name in names.items():
        modules = linear_of.get(pid, [])
        reason = refusal
        if reason is None and not modules:
            reason = "not the weight of an nn.Linear"
        if reason is None:
            reason = next((why for why in map(_why_not, modules) if why), None)
        if reason is not None:
            attachment.paths[name] = (HOOK, reason)
            continue
        for module in modules:
            module.__dict__["_mofasgd_intake"] = ref
            module.forward = types.MethodType(_projected_forward, module)
            attachment.modules.append(weakref.ref(module))
        attachment.paths[name] = (PROJECTED, (notes or {}).get(pid, ""))
    return attachment
