"""A small modern GPT: rotary embeddings, RMSNorm, QK-norm, ReLU² MLP, untied LM head, logit soft-cap.

The parameters fall into four roles (see `parameter_roles`): the hidden matrices of the transformer
blocks, which the optimizer under comparison trains, and the embedding, the LM head and the norm
gains, which always use Adam.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scripts.nanogpt.config import ModelConfig


class Rotary(nn.Module):
    """Rotary position embedding on the two halves of each head (cos/sin tables cached per length)."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def _tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] < length or self._cache[1] != device:
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), self.inv_freq.to(device))
            self._cache = (length, device, angles.cos(), angles.sin())
        return self._cache[2][:length], self._cache[3][:length]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape (batch, heads, time, head_dim)."""
        cos, sin = self._tables(x.size(-2), x.device)
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.type_as(x)


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v matrices, QK-norm and rotary embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.width // config.heads
        self.q = nn.Linear(config.width, config.width, bias=False)
        self.k = nn.Linear(config.width, config.width, bias=False)
        self.v = nn.Linear(config.width, config.width, bias=False)
        self.out = nn.Linear(config.width, config.width, bias=False)
        self.rotary = Rotary(self.head_dim, config.rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, time, width) -> (batch, time, width)."""
        batch, time, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, time, self.heads, self.head_dim).transpose(1, 2)

        # QK-norm keeps attention logits bounded whatever the optimizer does to the q/k matrices.
        q = self.rotary(F.rms_norm(heads(self.q(x)), (self.head_dim,)))
        k = self.rotary(F.rms_norm(heads(self.k(x)), (self.head_dim,)))
        y = F.scaled_dot_product_attention(q, k, heads(self.v(x)), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, time, width))


class MLP(nn.Module):
    """Two matrices with a squared ReLU in between (4x expansion)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.width, 4 * config.width, bias=False)
        self.down = nn.Linear(4 * config.width, config.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., width) -> (..., width)."""
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.width)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.width)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual attention then residual MLP."""
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only language model."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = nn.RMSNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections shrunk by 1/sqrt(2 depth). No zero
        # initialisation: GaLore and MoFaSGD derive subspaces from the first gradients or the weights.
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * self.config.depth) if name.endswith(("out.weight", "down.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (batch, time) token ids -> mean next-token cross-entropy (fp32) against `targets`.

        Without targets, returns the (soft-capped, fp32) logits of shape (batch, time, vocab) instead.
        """
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.final_norm(x)).float()
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def parameter_roles(model: GPT) -> dict[str, list[nn.Parameter]]:
    """Split parameters by role: "hidden" matrices in the blocks, and "embed", "head", "scalars" for Adam."""
    hidden = [p for p in model.blocks.parameters() if p.ndim == 2]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    roles = {"hidden": hidden, "embed": [model.embed.weight], "head": [model.head.weight], "scalars": scalars}
    assigned = sum(len(group) for group in roles.values())
    if assigned != len(list(model.parameters())):
        raise RuntimeError("parameter_roles left a parameter without a role; update it with the model")
    return roles
