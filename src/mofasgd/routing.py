"""Which parameters MoFaSGD manages: trainable 2-D hidden weights and MoE experts; the rest goes to AdamW.

MoE experts (transformers 5 fuses them into 3-D tensors, ``mlp.experts.gate_up_proj`` E x m x n) are stacks of E
matrices: each expert is trained as its own matrix. Routers (the E x hidden ``mlp.gate`` / ``router`` beside the
experts, and modules named ``*Router`` / ``*Gating``) stay on AdamW: they are small, and their few rows decide
which experts train. A score head on top of the model (TRL's and LLaMA-Factory's value head ``v_head`` of reward
models, transformers' ``score`` of sequence classifiers: hidden -> a few outputs) stays on AdamW like the LM head.
The input embeddings, the LM head, score heads and routers join MoFaSGD only when the target names their module
explicitly (``"all,embed_tokens,lm_head"``, ``"all,v_head"``, ``"all,gate"``): their gradients then live as projections
too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Routing:
    """The split of a model's trainable parameters (each tensor once, even when tied)."""

    mofasgd: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    adamw: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    routers: set[str] = field(default_factory=set)  # names of the MoE routers' parameters (either side)

    def table(self) -> str:
        """A readable routing table; layers that differ only by their index are folded into one `*` row.

        A stack of E experts reads ``MoFaSGD (E experts, each a matrix)`` and counts as E matrices; routers read
        ``AdamW (router)`` (or ``MoFaSGD (router)``).
        """
        folded: dict[tuple[str, str, str], int] = {}
        for dest, items in (("MoFaSGD", self.mofasgd), ("AdamW", self.adamw)):
            for name, p in items:
                where = dest
                if name in self.routers:
                    where = f"{dest} (router)"
                elif p.dim() == 3 and dest == "MoFaSGD":
                    where = f"{dest} ({p.shape[0]} experts, each a matrix)"
                key = (re.sub(r"\.\d+\.", ".*.", name), "x".join(map(str, p.shape)) or "scalar", where)
                folded[key] = folded.get(key, 0) + 1
        rows = [("parameter", "shape", "count", "optimizer")]
        rows += [(name, shape, str(count), dest) for (name, shape, dest), count in folded.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        managed = sum(p.numel() for _, p in self.mofasgd)
        others = sum(p.numel() for _, p in self.adamw)
        matrices = sum(p.shape[0] if p.dim() == 3 else 1 for _, p in self.mofasgd)
        stacks = [p for _, p in self.mofasgd if p.dim() == 3]
        experts = f" (of them {sum(p.shape[0] for p in stacks)} experts in {len(stacks)} tensors)" if stacks else ""
        lines.append(
            f"MoFaSGD: {matrices} matrices{experts}, {managed:,} params; AdamW: {len(self.adamw)} tensors, {others:,}"
        )
        return "\n".join(lines)


# Module attribute names a router has beside its `experts` (transformers 5: `mlp.gate`, `mlp.router`), and the class
# name endings of router modules elsewhere (MixtralTopKRouter, GraniteMoeTopKGating, ...).
_ROUTER_NAMES = ("gate", "router")
_ROUTER_CLASS_ENDINGS = ("Router", "Gating")
# Score heads held by the model itself: TRL's AutoModelForCausalLMWithValueHead (LLaMA-Factory's `stage: rm`)
# and transformers' *ForSequenceClassification.
_SCORE_HEAD_NAMES = ("v_head", "score")


def _excluded_ids(model: nn.Module) -> set[int]:
    """Identities of the input embedding, output head and score head weights, when the model has them."""
    ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            ids.add(id(weight))
    for name in _SCORE_HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            ids.update(id(p) for p in head.parameters())
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.add(id(module.weight))
    return ids


def _expert_modules_and_routers(model: nn.Module) -> tuple[set[str], set[str]]:
    """Module paths of the MoE expert containers (``experts``, ``*Experts``) and of the routers beside them."""
    experts: set[str] = set()
    routers: set[str] = set()
    for path, module in model.named_modules():
        kind = type(module).__name__
        if kind.endswith(_ROUTER_CLASS_ENDINGS):
            routers.add(path)
        children = dict(module.named_children())
        if "experts" in children:
            prefix = f"{path}." if path else ""
            experts.add(prefix + "experts")
            routers.update(prefix + name for name in _ROUTER_NAMES if name in children)
        if kind.endswith("Experts"):
            experts.add(path)
    return experts, routers


def split_for_mofasgd(model: nn.Module, target: str | list[str] = "all") -> Routing:
    """Route every trainable 2-D weight and MoE expert stack (not embeddings, heads, routers) to MoFaSGD.

    The rest goes to AdamW. An expert stack is a 3-D parameter held directly by an MoE experts module
    (``mlp.experts.gate_up_proj``, E x m x n): MoFaSGD trains each of its E matrices; 2-D parameters held there are
    per-expert biases (E x m) and go to AdamW.

    Args:
        model: the model whose parameters are split; tied weights are seen once (by identity).
        target: ``"all"`` or module-name patterns (comma-separated string or list); a pattern matches when
            it equals a dotted component of the parameter's module path or is a regex that ``search``-es it,
            like LLaMA-Factory's ``galore_target`` (e.g. ``"q_proj,v_proj"`` or ``["mlp"]``). ``all`` may be
            combined with other names. The input embeddings, the LM head, a score head (``v_head``, ``score``) and
            MoE routers are included only when a pattern equals their module name (e.g. ``"all,embed_tokens,lm_head"``,
            ``"all,gate"``), never through ``all`` or a regex. ``experts`` selects the expert stacks alone.
    """
    match_all, patterns = _parse_target(target)
    excluded = _excluded_ids(model)
    expert_modules, router_modules = _expert_modules_and_routers(model)
    routing = Routing()
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        module_path = name.rsplit(".", 1)[0]
        owner = module_path if "." in name else ""  # the path of the module holding p ("" for the root)
        router = any(owner == r or owner.startswith(r + ".") for r in router_modules)
        if router:
            routing.routers.add(name)
        if owner in expert_modules:
            matrix = p.dim() == 3
        else:
            matrix = p.dim() == 2
        if id(p) in excluded or router:
            wanted = matrix and any(pattern in module_path.split(".") for pattern in patterns)
        else:
            wanted = matrix and (match_all or _matches(module_path, patterns))
        (routing.mofasgd if wanted else routing.adamw).append((name, p))
    return routing


def _parse_target(target: str | list[str]) -> tuple[bool, list[str]]:
    """(whether `all` was given, the other patterns)."""
    items = [t.strip() for t in (target.split(",") if isinstance(target, str) else target) if t.strip()]
    if not items:
        raise ValueError("target must name at least one module pattern, or be 'all'")
    return "all" in items, [t for t in items if t != "all"]


def _matches(module_path: str, patterns: list[str]) -> bool:
    parts = module_path.split(".")
    return any(p in parts or re.search(p, module_path) for p in patterns)
