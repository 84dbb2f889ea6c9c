"""Which parameters MoFaSGD manages: trainable 2-D hidden weights; embeddings, LM head and the rest go to AdamW.

The input embeddings and the LM head join MoFaSGD only when the target names their module explicitly
(``"all,embed_tokens,lm_head"``): their gradients then live as projections too, the largest memory saving left.
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

    def table(self) -> str:
        """A readable routing table; layers that differ only by their index are folded into one `*` row."""
        folded: dict[tuple[str, str, str], int] = {}
        for dest, items in (("MoFaSGD", self.mofasgd), ("AdamW", self.adamw)):
            for name, p in items:
                key = (re.sub(r"\.\d+\.", ".*.", name), "x".join(map(str, p.shape)) or "scalar", dest)
                folded[key] = folded.get(key, 0) + 1
        rows = [("parameter", "shape", "count", "optimizer")]
        rows += [(name, shape, str(count), dest) for (name, shape, dest), count in folded.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        managed = sum(p.numel() for _, p in self.mofasgd)
        others = sum(p.numel() for _, p in self.adamw)
        lines.append(
            f"MoFaSGD: {len(self.mofasgd)} matrices, {managed:,} params; AdamW: {len(self.adamw)} tensors, {others:,}"
        )
        return "\n".join(lines)


def _excluded_ids(model: nn.Module) -> set[int]:
    """Identities of the input embedding and output head weights, when the model exposes them."""
    ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            ids.add(id(weight))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.add(id(module.weight))
    return ids


def split_for_mofasgd(model: nn.Module, target: str | list[str] = "all") -> Routing:
    """Route every trainable 2-D weight (except embeddings and the LM head) to MoFaSGD, the rest to AdamW.

    Args:
        model: the model whose parameters are split; tied weights are seen once (by identity).
        target: ``"all"`` or module-name patterns (comma-separated string or list); a pattern matches when
            it equals a dotted component of the parameter's module path or is a regex that ``search``-es it,
            like LLaMA-Factory's ``galore_target`` (e.g. ``"q_proj,v_proj"`` or ``["mlp"]``). ``all`` may be
            combined with other names. The input embeddings and LM head are included only when a pattern
            equals their module name (e.g. ``"all,embed_tokens,lm_head"``), never through ``all`` or a regex.
    """
    match_all, patterns = _parse_target(target)
    excluded = _excluded_ids(model)
    routing = Routing()
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        module_path = name.rsplit(".", 1)[0]
        if id(p) in excluded:
            wanted = p.dim() == 2 and any(pattern in module_path.split(".") for pattern in patterns)
        else:
            wanted = p.dim() == 2 and (match_all or _matches(module_path, patterns))
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
