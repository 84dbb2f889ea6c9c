"""Training-memory accounting of real LLaMA shapes on the meta device (no download, no weights).

For each model the script builds ``LlamaForCausalLM`` from a locally written ``LlamaConfig`` under
``torch.device("meta")`` and counts, from the real parameter shapes, what every method holds in pure bf16
training at per-device batch 1 / sequence 1024 (defaults): weights, gradients at their peak, optimizer state,
and an estimate of activations.

Assumptions (pure_bf16, as the memory-efficient configs set it):
- Weights and gradients are bf16 (2 bytes). AdamW moments are created like the parameter (torch AdamW's
  ``zeros_like``), so bf16: 4 bytes per trained parameter. Per-tensor ``step`` scalars are not counted.
- AdamW: every parameter trained; all gradients held at the end of backward.
- LoRA rank r on every decoder ``nn.Linear`` (q, k, v, o, gate, up, down; LLaMA-Factory's ``lora_target: all``):
  r (in + out) adapter parameters each. LLaMA-Factory calls ``peft.get_peft_model`` with peft's default
  ``autocast_adapter_dtype=True``, so the adapters are fp32 even under pure_bf16: 4 bytes of weight, 4 of
  gradient and 8 of AdamW moments per adapter parameter.
- GaLore rank r, ``proj_type: std``, on the same decoder linears (``galore_target: all``); embeddings, LM head
  and norms on AdamW. A GaLore m x n matrix keeps Adam moments of the projected gradient (r x max(m, n), bf16)
  and its projector (r x min(m, n), bf16). Non-fused GaLore holds the full gradient of every parameter.
- GaLore-fused (``galore_fused``): same state; between refresh steps a GaLore matrix holds an fp32 low-rank
  gradient accumulator (r x max(m, n)) instead of its gradient. On projector-refresh steps (every
  ``update_proj_gap`` steps, and the first) it holds full gradients like non-fused GaLore; not shown here.
- MoFaSGD rank r (fused): every 2-D weight except input embeddings and LM head is managed, the rest is on
  AdamW. State 4 ((m + n) r + r) bytes per managed matrix (fp32 U, S, V); between steps the fp32 projections
  G V and G^T U, 4 (m + n) r bytes, stand in for the gradient.
- MoFaSGD+emb/head (``mfsgd_target: all,embed_tokens,lm_head``): the same with the input embeddings and the LM
  head managed too; only the norms stay on AdamW.
- MoFaSGD+factored (``mfsgd_adamw_state: factored``): the authors' routing, with the AdamW-side matrices
  (embeddings, LM head) keeping their bf16 first moment and fp32 row and column means of g^2 (4 (m + n) bytes)
  instead of the bf16 second moment; ``-no-momentum`` (``factored_no_momentum``) drops the first moment too.
- ``+fused-side`` (``mfsgd_fused_adamw_side``): the AdamW side is updated in its gradient hooks as well, so
  only one matrix gradient (at most the largest, the LM head's or embeddings') is in flight at a time, plus the
  norms' gradients (updated at the step).
- Fused methods: while backward runs one managed gradient exists at a time before its hook frees it; the
  largest such m x n bf16 gradient is added to their gradient column.

Activations (bytes per token, bf16, SDPA/flash attention keeping K and V at their grouped size, no dropout,
no KV cache, HF's LlamaRMSNorm which saves an fp32 copy of its input; h hidden, h_kv = kv heads x head dim d,
i intermediate, a heads, V vocabulary, L layers, T = batch x seq tokens):
- one decoder layer saves A_layer = 2 (6h + 4) [two RMSNorms: fp32 input, bf16 normalised, fp32 rsqrt]
  + 2h [q/k/v input] + 2h + 4 h_kv [q, k, v after RoPE] + 2h + 4a [attention output, which o_proj saves as
  the same storage, and the fp32 logsumexp] + 2h [gate/up input] + 8i [gate, silu(gate), up, down input]
  = 20h + 4 h_kv + 8i + 4a + 8;
- with fp32 LoRA adapters and frozen base weights a layer instead saves, per adapted linear with input width
  k, an fp32 copy of its input and the lora_A output (4k + 4r; peft casts the input to the adapter dtype),
  and no bf16 linear inputs: A_lora = 2 (4h + 4) + 4h + 4 h_kv + 4a + 6i + sum(4k + 4r); the first layer's
  input norm saves nothing (its input needs no gradient) and neither does the frozen LM head (A_final - 4h);
- once per forward A_final = 8h + 4 [final norm, LM-head input] + 4d [RoPE cos, sin] + 16 [ids, labels]
  + 10 V [bf16 logits, their fp32 copy, and the fp32 log-probabilities cross-entropy saves: all alive at
  the end of the forward pass, where activation memory peaks].
- Without checkpointing: T (L A_layer + A_final). With gradient checkpointing (LLaMA-Factory's default) a
  layer keeps only its bf16 input and one layer is recomputed at a time: T (2 L h + A_layer + A_final).
  The checkpointed figure is the one in the totals.
On CPU this matches the tensors autograd saves in a real bf16 forward (tests/test_memory_accounting.py).

The total is the sum of the four columns: an upper bound, since activations peak at the start of backward
while non-fused gradients peak at its end.

With ``--fsdp2-gpus W`` the script also writes ``fsdp2_<W>gpu.md`` / ``.json``: per-GPU memory of AdamW, LoRA and
MoFaSGD under FSDP2 (``fully_shard``) on W GPUs for ``--fsdp2-models``: sharded weights, gradients and optimizer
state, the transient unsharded parameters and gradients of the backward schedule, and per-GPU activations. Its
assumptions are spelled out in ``FSDP2_ASSUMPTIONS`` (and in the markdown it writes).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mofasgd import MoFaSGD, split_for_mofasgd
from mofasgd.intake import SHARED_BUFFER_RATIO

BF16 = 2
FP32 = 4
GIB = 1024**3
# MoFaSGD with a compact AdamW side (`mfsgd_adamw_state`), on the authors' routing
ADAMW_STATE_ROWS = {"MoFaSGD+factored": "factored", "MoFaSGD+factored-no-momentum": "factored_no_momentum"}
# ... and with the AdamW side updated in its gradient hooks (`mfsgd_fused_adamw_side`)
FUSED_SIDE_ROWS = {"MoFaSGD+fused-side": "full", "MoFaSGD+factored-no-momentum+fused-side": "factored_no_momentum"}
METHODS = (
    "AdamW",
    "LoRA",
    "GaLore",
    "GaLore-fused",
    "MoFaSGD",
    "MoFaSGD+emb/head",
    *ADAMW_STATE_ROWS,
    *FUSED_SIDE_ROWS,
)
# mfsgd_target of the MoFaSGD rows: the authors' routing, and with the input embeddings and LM head managed too
MOFASGD_TARGETS = {"MoFaSGD": "all", "MoFaSGD+emb/head": "all,embed_tokens,lm_head"}
COMPONENTS = ("weights", "gradients", "optimizer_state", "activations")

LLAMA_SHAPES = {
    "Llama-3.1-8B": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "Llama-3.2-1B": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "Llama-3.1-70B": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}


@dataclass
class MethodMemory:
    """Bytes one method holds, by component; ``activations_no_checkpointing`` is reported beside the total."""

    method: str
    trainable_params: int
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    activations_no_checkpointing: int
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = self.weights + self.gradients + self.optimizer_state + self.activations


@dataclass
class ModelShapes:
    """What the accounting needs from a model: parameter shapes split by role (tied weights counted once)."""

    all_params: list[torch.Size]
    decoder_linears: list[torch.Size]  # LoRA / GaLore targets: decoder nn.Linear weights (not the LM head)
    mofasgd_matrices: dict[str, list[torch.Size]]  # MoFaSGD row -> what split_for_mofasgd routes to MoFaSGD
    adamw_side: dict[str, list[torch.Size]]  # MoFaSGD row -> what it leaves on its AdamW side
    lora_in_features: tuple[int, ...]  # input widths of one decoder layer's LoRA targets


def build_meta_model(config: LlamaConfig) -> LlamaForCausalLM:
    """The real module tree with meta tensors in bf16: shapes without memory."""
    with torch.device("meta"):
        return LlamaForCausalLM(config).to(torch.bfloat16)


def model_shapes(model: nn.Module) -> ModelShapes:
    """Collect the parameter shapes of ``model`` by the role each method gives them."""
    head = model.get_output_embeddings()
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    first_layer = [m.in_features for name, m in linears if name.startswith("model.layers.0.")]
    return ModelShapes(
        all_params=[p.shape for p in model.parameters()],
        decoder_linears=[m.weight.shape for _, m in linears],
        mofasgd_matrices={
            row: [p.shape for _, p in split_for_mofasgd(model, target).mofasgd]
            for row, target in MOFASGD_TARGETS.items()
        },
        adamw_side={
            row: [p.shape for _, p in split_for_mofasgd(model, target).adamw]
            for row, target in MOFASGD_TARGETS.items()
        },
        lora_in_features=tuple(first_layer),
    )


def activation_bytes(
    config: LlamaConfig, batch_size: int, seq_len: int, lora_rank: int = 0, lora_in_features: tuple[int, ...] = ()
) -> tuple[int, int]:
    """(with gradient checkpointing, without) activation bytes; formula in the module docstring.

    For LoRA pass the rank and the input width of every adapted linear of one decoder layer.
    """
    h, i, a = config.hidden_size, config.intermediate_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // a
    h_kv = config.num_key_value_heads * head_dim
    tokens = batch_size * seq_len
    attention = 4 * h + 4 * h_kv + 4 * a
    final = 8 * h + 4 + 4 * head_dim + 16 + 10 * config.vocab_size
    layers = config.num_hidden_layers
    if lora_rank:
        norm = FP32 * h + 4
        per_layer = 2 * norm + attention + 6 * i + sum(FP32 * (k + lora_rank) for k in lora_in_features)
        all_layers = layers * per_layer - norm
        final -= FP32 * h
    else:
        per_layer = 2 * (6 * h + 4) + 2 * h + attention + 2 * h + 8 * i
        all_layers = layers * per_layer
    with_checkpointing = tokens * (layers * BF16 * h + per_layer + final)
    return with_checkpointing, tokens * (all_layers + final)


def galore_state_bytes(shape: torch.Size, rank: int) -> int:
    """Adam moments of the projected gradient plus the projector, bf16 (proj_type std)."""
    r = min(rank, *shape)
    return 2 * BF16 * r * max(shape) + BF16 * r * min(shape)


def account(config: LlamaConfig, rank: int = 8, batch_size: int = 1, seq_len: int = 1024) -> list[MethodMemory]:
    """Memory of every method in ``METHODS`` for the LLaMA that ``config`` describes."""
    shapes = model_shapes(build_meta_model(config))
    total_params = sum(s.numel() for s in shapes.all_params)
    weights = BF16 * total_params
    adam_per_param = 2 * BF16
    acts, acts_full = activation_bytes(config, batch_size, seq_len)

    lora_params = sum(min(rank, *s) * (s[0] + s[1]) for s in shapes.decoder_linears)
    lora_acts = activation_bytes(config, batch_size, seq_len, rank, shapes.lora_in_features)

    galore_numel = sum(s.numel() for s in shapes.decoder_linears)
    galore_state = sum(galore_state_bytes(s, rank) for s in shapes.decoder_linears)
    galore_rest_state = adam_per_param * (total_params - galore_numel)
    galore_accumulators = sum(FP32 * min(rank, *s) * max(s) for s in shapes.decoder_linears)
    largest_linear = BF16 * max(s.numel() for s in shapes.decoder_linears)

    def mofasgd_row(
        row: str, routing: str | None = None, adamw_state: str = "full", fused_side: bool = False
    ) -> MethodMemory:
        routing = routing or row
        matrices = shapes.mofasgd_matrices[routing]
        state = sum(MoFaSGD.expected_factor_bytes(tuple(s), rank) for s in matrices)
        projections = sum(FP32 * (s[0] + s[1]) * min(rank, *s) for s in matrices)
        largest_managed = BF16 * max(s.numel() for s in matrices)
        rest = total_params - sum(s.numel() for s in matrices)
        gradients = BF16 * rest + projections + largest_managed
        if fused_side:  # every matrix gradient is consumed in its hook: one (the largest) in flight at a time
            side = shapes.adamw_side[routing]
            largest = max(largest_managed, max(BF16 * s.numel() for s in side if len(s) == 2))
            vectors = BF16 * sum(s.numel() for s in side if len(s) != 2)  # norms: updated at step()
            gradients = projections + vectors + largest
        side = sum(adamw_side_state_bytes(s, adamw_state) for s in shapes.adamw_side[routing])
        return MethodMemory(row, total_params, weights, gradients, state + side, acts, acts_full)

    return [
        MethodMemory("AdamW", total_params, weights, weights, adam_per_param * total_params, acts, acts_full),
        MethodMemory(
            "LoRA", lora_params, weights + FP32 * lora_params, FP32 * lora_params, 2 * FP32 * lora_params, *lora_acts
        ),
        MethodMemory("GaLore", total_params, weights, weights, galore_state + galore_rest_state, acts, acts_full),
        MethodMemory(
            "GaLore-fused",
            total_params,
            weights,
            BF16 * (total_params - galore_numel) + galore_accumulators + largest_linear,
            galore_state + galore_rest_state,
            acts,
            acts_full,
        ),
        *(mofasgd_row(row) for row in MOFASGD_TARGETS),
        *(mofasgd_row(row, "MoFaSGD", state) for row, state in ADAMW_STATE_ROWS.items()),
        *(mofasgd_row(row, "MoFaSGD", state, fused_side=True) for row, state in FUSED_SIDE_ROWS.items()),
    ]


def adamw_side_state_bytes(shape: torch.Size, adamw_state: str) -> int:
    """AdamW-side state of one tensor: two bf16 moments, or for a matrix with a factored second moment fp32
    row and column means (plus the bf16 first moment unless `factored_no_momentum`)."""
    if adamw_state == "full" or len(shape) != 2:
        return 2 * BF16 * shape.numel()
    first = BF16 * shape.numel() if adamw_state == "factored" else 0
    return first + FP32 * (shape[0] + shape[1])


# ---------------------------------------------------------------------------------------------------- FSDP2
FSDP2_METHODS = ("AdamW", "LoRA", "MoFaSGD", "MoFaSGD+emb/head")
FSDP2_MODELS = ("Llama-3.1-8B", "Llama-3.1-70B")
FSDP2_COMPONENTS = ("weights", "gradients", "optimizer_state", "transient", "activations")
FSDP2_ASSUMPTIONS = """\
Assumptions (per GPU, FSDP2 `fully_shard` on a 1-D mesh of W GPUs; torch 2.14 / accelerate 1.11 behaviour):
- Wrapping as LLaMA-Factory gets it from accelerate (`fsdp: full_shard auto_wrap`, `fsdp_version: 2`,
  `transformer_layer_cls_to_wrap: [LlamaDecoderLayer]`, `reshard_after_forward: true`): one FSDP unit per
  decoder layer, and the root unit holds the input embeddings, the final norm and the LM head.
- Pure bf16 (`pure_bf16: true`, `bf16` unset, so accelerate's mixed precision is "no" and nothing is upcast):
  bf16 weights, gradients and all-gather / reduce-scatter; AdamW moments like their parameter (bf16; fp32 for
  the fp32 LoRA adapters). With `bf16: true` accelerate upcasts the model to fp32 for FSDP2; not covered here.
- Sharding: every parameter along dim 0 into W chunks like torch.chunk; a GPU holds ceil(rows / W) rows (FSDP2
  pads every rank's shard to that size), so weights, gradients and AdamW moments are 1/W of the model for
  these shapes (every dim 0 is a multiple of 8). LoRA adapters are sharded too (FSDP2 shards every parameter).
- MoFaSGD (fused hooks, as src/mofasgd runs under FSDP2): per managed m x n matrix a GPU keeps ceil(m/W) x r
  rows of U, all of V (n x r) and S (r), fp32: 4 (ceil(m/W) r + n r + r) bytes; its hooks turn each gradient
  shard into G V (ceil(m/W) x r) and this GPU's share of G^T U (n x r), fp32, kept until the step.
- FSDP2 reduce-scatters a unit's gradients into one flat buffer and hands every parameter a view of it.
  MoFaSGD's hooks consume the managed matrices' views, and copy the AdamW-side views that are a small part of
  a buffer (a decoder layer's norm weights) out of it, so the buffer is freed (checked with 2 gloo processes in
  tests/test_memory_accounting.py): MoFaSGD holds the AdamW-side gradient shards only, plus one unit's managed
  shards while its hooks run (counted as transient). Where a large AdamW-side shard stays a view (the root's
  embeddings and LM head), that buffer lives on and the copied final-norm shard is counted twice.
- Transient (unsharded, alive during backward): the root unit stays unsharded from the start of backward to
  its reduce-scatter in the final callback (its input, the token ids, needs no gradient), and the LM head's
  and final norm's unsharded gradients live as long. While decoder layer u runs backward a GPU holds: the
  root's parameters and LM-head/norm gradients, the parameters of layer u and of the prefetched layer u - 1,
  the unsharded gradients of layer u, and the reduce-scatter input of layer u + 1 (FSDP2 keeps one such
  buffer in flight): 2 layers' parameters + 2 layers' gradients. Also taken: the LM head's step (root, layer
  L-1 parameters, head gradient), the embedding's step, and the root's reduce-scatter (its unsharded
  gradients plus their reduce-scatter copy). The transient column is the largest of these moments. The root
  staying unsharded with the LM-head gradient is checked in the gloo test; the layer counts follow torch's
  `FSDPParamGroup.post_backward` (reshard, then at most `reduce_scatter_max_input_buffers` = 1 input in flight).
- Activations are per GPU and not sharded: the single-GPU model above, micro-batch per GPU, gradient
  checkpointing on.
- Not counted: per-tensor `step` scalars, the optimizer step's temporaries, MoFaSGD's one-time factor
  initialisation (it all-gathers each managed matrix once, at the first step), communication buffers of
  G^T U (small), and allocator fragmentation.
- The total adds every column, an upper bound: activations peak at the start of backward, the gradient
  shards are complete at its end.
"""


def shard_numel(shape: torch.Size | tuple[int, ...], world_size: int) -> int:
    """Elements one GPU holds of a parameter FSDP2 shards along dim 0 (rank 0's chunk, the padded size)."""
    if len(shape) == 0:
        return 1
    rows = -(-shape[0] // world_size)
    return rows * (torch.Size(shape[1:]).numel() if len(shape) > 1 else 1)


def fsdp2_factor_bytes(shape: torch.Size | tuple[int, int], rank: int, world_size: int) -> int:
    """fp32 U rows of this GPU's shard, all of V and S, for a managed m x n matrix."""
    m, n = shape
    r = min(rank, m, n)
    return FP32 * (-(-m // world_size) * r + n * r + r)


def fsdp2_projection_bytes(shape: torch.Size | tuple[int, int], rank: int, world_size: int) -> int:
    """fp32 G V of this GPU's rows and its share of G^T U for a managed m x n matrix."""
    m, n = shape
    return FP32 * (-(-m // world_size) + n) * min(rank, m, n)


@dataclass
class Fsdp2Param:
    """One parameter as FSDP2 and each method see it (tied weights once)."""

    shape: torch.Size
    unit: int  # 0: the root (embeddings, final norm, LM head); i + 1: decoder layer i
    embedding: bool  # the input embedding's gradient appears at the end of backward (a tied one counts as head)
    lora_target: bool
    managed_by: frozenset[str]  # MoFaSGD rows (MOFASGD_TARGETS) that route it to MoFaSGD


@dataclass
class Fsdp2Memory:
    """Bytes one GPU holds under FSDP2, by component; ``single_gpu_total`` is the same method without FSDP."""

    method: str
    world_size: int
    weights: int
    gradients: int
    optimizer_state: int
    transient: int
    activations: int
    single_gpu_total: int
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = self.weights + self.gradients + self.optimizer_state + self.transient + self.activations


def fsdp2_params(model: LlamaForCausalLM) -> list[Fsdp2Param]:
    """Every parameter of ``model`` with its FSDP2 unit (accelerate's decoder-layer wrapping) and routing."""
    routed = {row: {id(p) for _, p in split_for_mofasgd(model, t).mofasgd} for row, t in MOFASGD_TARGETS.items()}
    head = model.get_output_embeddings()
    lora = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}
    embedding = model.get_input_embeddings().weight
    unit_of = {id(p): i + 1 for i, layer in enumerate(model.model.layers) for p in layer.parameters()}
    return [
        Fsdp2Param(
            shape=p.shape,
            unit=unit_of.get(id(p), 0),
            embedding=p is embedding and p is not head.weight,
            lora_target=id(p) in lora,
            managed_by=frozenset(row for row, ids in routed.items() if id(p) in ids),
        )
        for p in model.parameters()
    ]


@dataclass
class _Unit:
    """Per-unit byte sums the backward schedule needs."""

    params: int = 0  # unsharded parameters (all-gathered)
    grads_early: int = 0  # unsharded gradients produced at the start of backward (root: LM head, final norm)
    grads_late: int = 0  # unsharded gradients produced later (root: embeddings; layers: all)
    rs_input: int = 0  # reduce-scatter input: the unsharded gradients padded to W shards
    managed_shards: int = 0  # this GPU's shards of the unit's MoFaSGD-managed gradients
    adamw_shards: list[int] = field(default_factory=list)  # this GPU's AdamW-side gradient shards (MoFaSGD runs)


def kept_buffer_bytes(unit: _Unit, ratio: int = SHARED_BUFFER_RATIO) -> int:
    """Gradient bytes a MoFaSGD unit holds beyond its AdamW-side shards.

    MoFaSGD copies an AdamW-side shard out of the unit's flat reduce-scatter buffer when the buffer is at least
    `ratio` times its size (the optimizer's rule, mofasgd.intake.SHARED_BUFFER_RATIO). If a larger AdamW-side shard
    stays a view (the root's embeddings and LM head), the buffer lives on: its managed shards and the copies are
    extra.
    """
    buffer = unit.managed_shards + sum(unit.adamw_shards)
    copied = [b for b in unit.adamw_shards if buffer >= ratio * b]
    if len(copied) == len(unit.adamw_shards):
        return 0
    return unit.managed_shards + sum(copied)


def fsdp2_transient_bytes(units: list[_Unit]) -> int:
    """The largest unsharded footprint over the backward schedule (module docstring / FSDP2_ASSUMPTIONS)."""
    root, layers = units[0], units[1:]
    held = root.params + root.grads_early  # from the start of backward to the final callback
    moments = [held + (layers[-1].params if layers else 0)]  # LM head backward, last layer prefetched
    for u in range(len(layers) - 1, -1, -1):
        prefetched = layers[u - 1].params if u > 0 else 0
        in_flight = layers[u + 1].rs_input if u + 1 < len(layers) else 0
        moments.append(held + layers[u].params + prefetched + layers[u].grads_late + in_flight)
    moments.append(held + root.grads_late + (layers[0].rs_input if layers else 0))  # embedding backward
    moments.append(root.grads_early + root.grads_late + root.rs_input)  # root reduce-scatter; params resharded
    return max(moments)


def account_fsdp2(
    config: LlamaConfig, world_size: int = 8, rank: int = 8, batch_size: int = 1, seq_len: int = 1024
) -> list[Fsdp2Memory]:
    """Per-GPU memory under FSDP2 on ``world_size`` GPUs of every method in ``FSDP2_METHODS``."""
    model = build_meta_model(config)
    params = fsdp2_params(model)
    single = {r.method: r.total for r in account(config, rank, batch_size, seq_len)}
    acts, _ = activation_bytes(config, batch_size, seq_len)
    lora_acts, _ = activation_bytes(config, batch_size, seq_len, rank, model_shapes(model).lora_in_features)
    n_units = config.num_hidden_layers + 1
    W = world_size

    def row(method: str) -> Fsdp2Memory:
        lora = method == "LoRA"
        mofasgd = method.split(" ")[0] if method.startswith("MoFaSGD") else None
        units = [_Unit() for _ in range(n_units)]
        weights = gradients = state = 0
        for p in params:
            unit, numel, shard = units[p.unit], p.shape.numel(), shard_numel(p.shape, W)
            weights += BF16 * shard
            unit.params += BF16 * numel
            pieces: list[tuple[int, int, int]] = []  # trained (numel, shard, bytes per element)
            if lora:
                if p.lora_target:
                    r = min(rank, *p.shape)
                    a, b = (r, p.shape[1]), (p.shape[0], r)
                    adapter, adapter_shard = r * (p.shape[0] + p.shape[1]), shard_numel(a, W) + shard_numel(b, W)
                    weights += FP32 * adapter_shard
                    unit.params += FP32 * adapter
                    state += 2 * FP32 * adapter_shard
                    gradients += FP32 * adapter_shard
                    pieces.append((adapter, adapter_shard, FP32))
            elif mofasgd is not None and mofasgd in p.managed_by:
                state += fsdp2_factor_bytes(p.shape, rank, W)
                gradients += fsdp2_projection_bytes(p.shape, rank, W)
                unit.managed_shards += BF16 * shard
                pieces.append((numel, shard, BF16))
            else:  # AdamW, or MoFaSGD's AdamW side
                state += 2 * BF16 * shard
                gradients += BF16 * shard
                unit.adamw_shards.append(BF16 * shard)
                pieces.append((numel, shard, BF16))
            for numel_, shard_, size in pieces:
                grad = size * numel_
                if p.unit == 0 and not p.embedding:
                    unit.grads_early += grad
                else:
                    unit.grads_late += grad
                unit.rs_input += size * W * shard_
        transient = fsdp2_transient_bytes(units)
        if mofasgd is not None:  # one unit's managed shards live while its hooks consume them
            transient += max((u.managed_shards for u in units), default=0)
            gradients += sum(kept_buffer_bytes(u) for u in units)
        base = mofasgd if mofasgd is not None else method
        return Fsdp2Memory(method, W, weights, gradients, state, transient, lora_acts if lora else acts, single[base])

    return [row(method) for method in FSDP2_METHODS]


def fsdp2_markdown(name: str, config: LlamaConfig, rows: list[Fsdp2Memory], batch_size: int, seq_len: int) -> str:
    """One markdown table (GiB per GPU) for one model under FSDP2."""
    world = rows[0].world_size
    header = (
        f"### {name}, FSDP2 on {world} GPUs (hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"vocab {config.vocab_size}; micro-batch {batch_size} per GPU, seq {seq_len})\n\n"
        "| method | weights | gradients | optimizer state | transient unsharded | activations (ckpt) "
        "| per-GPU total | single GPU total (no FSDP) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r.method} | {r.weights / GIB:.2f} | {r.gradients / GIB:.2f} | {r.optimizer_state / GIB:.3f} | "
        f"{r.transient / GIB:.2f} | {r.activations / GIB:.2f} | {r.total / GIB:.2f} | "
        f"{r.single_gpu_total / GIB:.2f} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def markdown_table(name: str, config: LlamaConfig, rows: list[MethodMemory], batch_size: int, seq_len: int) -> str:
    """One markdown table (GiB) for one model."""
    header = (
        f"### {name} (hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
        f"{config.num_hidden_layers} layers, vocab {config.vocab_size}, "
        f"{'tied' if config.tie_word_embeddings else 'untied'} embeddings; batch {batch_size}, seq {seq_len})\n\n"
        "| method | trainable params | weights | gradients (peak) | optimizer state | activations (ckpt) "
        "| total | activations (no ckpt) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r.method} | {r.trainable_params:,} | {r.weights / GIB:.2f} | {r.gradients / GIB:.2f} | "
        f"{r.optimizer_state / GIB:.3f} | {r.activations / GIB:.2f} | {r.total / GIB:.2f} | "
        f"{r.activations_no_checkpointing / GIB:.2f} |"
        for r in rows
    ]
    return (
        header + "\n".join(lines) + "\n\nAll sizes in GiB; total = weights + gradients + state + activations (ckpt).\n"
    )


def plot(results: dict[str, list[MethodMemory]], path: Path) -> None:
    """Stacked bars (GiB) per method, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        bottom = [0.0] * len(rows)
        for component in COMPONENTS:
            heights = [getattr(r, component) / GIB for r in rows]
            ax.bar([r.method for r in rows], heights, bottom=bottom, label=component.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, heights)]
        ax.set_title(name)
        ax.set_ylabel("GiB (pure bf16)")
        ax.tick_params(axis="x", labelrotation=20)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, list[MethodMemory]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/memory_accounting"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--models", nargs="+", choices=sorted(LLAMA_SHAPES), default=list(LLAMA_SHAPES))
    parser.add_argument("--fsdp2-gpus", type=int, default=0, help="also account FSDP2 per GPU on this many GPUs")
    parser.add_argument("--fsdp2-models", nargs="+", choices=sorted(LLAMA_SHAPES), default=list(FSDP2_MODELS))
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    results, tables = {}, []
    for name in args.models:
        config = LlamaConfig(**LLAMA_SHAPES[name])
        results[name] = account(config, args.rank, args.batch_size, args.seq_len)
        tables.append(markdown_table(name, config, results[name], args.batch_size, args.seq_len))
    report = "\n".join(tables)
    print(report)
    (args.out / "memory_accounting.md").write_text(report)
    payload = {
        "settings": {"rank": args.rank, "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": "bfloat16"},
        "models": {
            name: {"config": LLAMA_SHAPES[name], "methods": [asdict(r) for r in rows]}
            for name, rows in results.items()
        },
    }
    (args.out / "memory_accounting.json").write_text(json.dumps(payload, indent=2))
    plot(results, args.out / "memory_accounting.png")
    if args.fsdp2_gpus:
        write_fsdp2(args.out, args.fsdp2_gpus, args.fsdp2_models, args.rank, args.batch_size, args.seq_len)
    return results


def write_fsdp2(
    out: Path, world_size: int, models: list[str], rank: int, batch_size: int, seq_len: int
) -> dict[str, list[Fsdp2Memory]]:
    """Write ``fsdp2_<W>gpu.md`` and ``.json`` (per-GPU GiB under FSDP2) for ``models``."""
    results, tables = {}, []
    for name in models:
        config = LlamaConfig(**LLAMA_SHAPES[name])
        results[name] = account_fsdp2(config, world_size, rank, batch_size, seq_len)
        tables.append(fsdp2_markdown(name, config, results[name], batch_size, seq_len))
    report = (
        f"## Per-GPU memory under FSDP2 on {world_size} GPUs (pure bf16, rank {rank})\n\n"
        + "\n".join(tables)
        + "\nAll sizes in GiB per GPU; per-GPU total = weights + gradients + optimizer state + transient + "
        "activations. Single GPU total: the same method on one GPU without FSDP (memory_accounting.md).\n\n"
        + FSDP2_ASSUMPTIONS
    )
    print(report)
    stem = f"fsdp2_{world_size}gpu"
    (out / f"{stem}.md").write_text(report)
    payload = {
        "settings": {
            "world_size": world_size,
            "rank": rank,
            "batch_size_per_gpu": batch_size,
            "seq_len": seq_len,
            "dtype": "bfloat16",
            "assumptions": FSDP2_ASSUMPTIONS,
        },
        "models": {name: [asdict(r) for r in rows] for name, rows in results.items()},
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    return results


if __name__ == "__main__":
    main()
