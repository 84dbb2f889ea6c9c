"""One LLaMA decoder layer's weights as a cheap model: the workload of the DDP and FSDP2 communication benchmarks."""

from __future__ import annotations

import torch
from torch import nn

LLAMA_8B = {"hidden": 4096, "intermediate": 14336, "kv": 1024}


class LlamaLayerMatrices(nn.Module):
    """The weights of one LLaMA decoder layer, wired into a cheap differentiable function (not attention)."""

    def __init__(self, hidden: int, intermediate: int, kv: int) -> None:
        super().__init__()
        self.input_norm = nn.Parameter(torch.ones(hidden))
        self.post_norm = nn.Parameter(torch.ones(hidden))
        self.q_proj, self.o_proj = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.k_proj, self.v_proj = nn.Linear(hidden, kv, bias=False), nn.Linear(hidden, kv, bias=False)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.input_norm
        kv = self.k_proj(h).sum(-1, keepdim=True) + self.v_proj(h).sum(-1, keepdim=True)
        h = x + self.o_proj(self.q_proj(h) * torch.tanh(kv))
        g = h * self.post_norm
        return h + self.down_proj(nn.functional.silu(self.gate_proj(g)) * self.up_proj(g))


def layer_matrix_shapes(hidden: int, intermediate: int, kv: int) -> list[tuple[int, int]]:
    """(out, in) of q, k, v, o, gate, up, down."""
    h, i = hidden, intermediate
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
