"""Bytes MoFaSGD itself communicates per step under FSDP2, for one LLaMA decoder layer, against the formula.

Two gloo processes train the seven projection matrices and two RMSNorm gains of a LLaMA layer, sharded by FSDP2
as a decoder layer is (``fully_shard`` on the layer, then on the root). Each step is measured in three phases:
forward + backward (FSDP2's own all-gathers and reduce-scatter), ``clip_grad_norm_`` and ``step``. The
optimizer's collectives are measured from outside it, twice:

* a ledger: ``torch.distributed``'s collective functions are wrapped while a phase runs, and each call is booked
  under the innermost ``mofasgd`` function that issued it (``synchronize`` (the intake's), ``grad_norm``,
  ``finite_entries``, ``cholesky_qr2``, ``nesterov_direction``) and, below ``_bucket_step``, under the global shape
  of the matrices that bucket steps (read from that frame; nothing in the optimizer is patched);
* an audit: torch.profiler records every collective the gloo process group runs, however it was issued (DTensor
  redistributions use functional collectives, which bypass those Python functions), and the ledger has to
  account for all of it.

Bytes are those of the buffer a collective works on: an all-reduce's tensor, an all-gather's gathered result, a
reduce-scatter's whole input. None depends on the world size W; a ring moves about 2 (W - 1) / W of an
all-reduce's bytes per rank and (W - 1) / W of an all-gather's or a reduce-scatter's.

The first step is reported apart (each rank all-gathers every W once, to factor it). The other steps must match
the formula (formula_ledger) call by call, which then gives the numbers for the LLaMA-3.1-8B and 70B layers.

    python -m benchmarks.fsdp2_communication [--hidden 256 --intermediate 704 --kv 64 --rank 8] [--output F]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.llama_layer import LLAMA_8B, LlamaLayerMatrices, layer_matrix_shapes
from llamafactory_mfsgd.gloo_exit import exit_spawned_worker
from llamafactory_mfsgd.launcher import free_port
from mofasgd import MoFaSGD, split_for_mofasgd

LLAMA_70B = {"hidden": 8192, "intermediate": 28672, "kv": 1024}
WORLD = 2
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # layer_matrix_shapes order
# name -> (optimizer, nesterov, the matrix made to get a zero gradient: its bucket takes the gathered QR fallback)
METHODS = {
    "adamw": ("adamw", False, None),
    "mofasgd": ("mofasgd", False, None),
    "mofasgd_nesterov": ("mofasgd", True, None),
    "mofasgd_zero_grad_v": ("mofasgd", False, "v_proj"),
}
# the torch.distributed collectives the ledger wraps (those this torch has); the audit sees any other route
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "broadcast",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "all_to_all_single",
)
PHASES = ("forward_backward", "clip", "step")
# A ledger maps (issuing mofasgd function, collective, dtype, global shape of the bucket or None) to [calls, numbers]
Ledger = dict[tuple, list[int]]


class GqaLayerMatrices(LlamaLayerMatrices):
    """llama_layer's layer with K and V used per feature (GQA-like: each kv feature serves hidden/kv ones).

    There K and V enter only through a sum over their outputs, so their gradients are rank 1 and their
    [U | G V] panels rank-deficient every step: CholeskyQR2 would take its gathered fallback on every step,
    which a real LLaMA layer does not. Needs kv to divide hidden.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.input_norm
        mix = torch.tanh(self.k_proj(h)) * self.v_proj(h)
        mix = mix.repeat_interleave(h.shape[-1] // mix.shape[-1], dim=-1)
        h = x + self.o_proj(self.q_proj(h) * torch.tanh(mix))
        g = h * self.post_norm
        return h + self.down_proj(nn.functional.silu(self.gate_proj(g)) * self.up_proj(g))


class OneLayerModel(nn.Module):
    """A root holding one decoder layer, sharded like a real model: fully_shard(layer), then fully_shard(root)."""

    def __init__(self, hidden: int, intermediate: int, kv: int) -> None:
        super().__init__()
        if hidden % kv:
            raise ValueError(f"kv ({kv}) must divide hidden ({hidden})")
        self.layer = GqaLayerMatrices(hidden, intermediate, kv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# ---------------------------------------------------------------------------------------------------- formula
def formula_ledger(
    shapes: list[tuple[int, int]], rank: int, nesterov: bool = False, zero_grad: tuple[int, ...] = ()
) -> Ledger:
    """[calls, numbers] per step (after the first) of every collective MoFaSGD issues for row-sharded matrices.

    Per matrix (m x n, r = min(rank, m, n)): n r + 1 fp32 (its G^T U share and a seen flag) in one all-reduce
    for all matrices; r^2 fp64 (its U^T G V share) in the grad norm's single all-reduce, which adds one number
    (all the other squared-norm shares). Matrices of one shape are stepped as one bucket of B: one all-reduce of
    B non-finite flags, two of B (2r)^2 Gram numbers (CholeskyQR2), with Nesterov one of B 2r r. A bucket holding
    a matrix of `zero_grad` (rank-deficient panel) also all-gathers the [U | G V] panels of those matrices only.
    """
    ledger: Ledger = {}

    def add(key: tuple, numbers: int) -> None:
        entry = ledger.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += numbers

    ranks = [min(rank, m, n) for m, n in shapes]
    add(("synchronize", "all_reduce", "float32", None), sum(n * r + 1 for (_, n), r in zip(shapes, ranks)))
    add(("grad_norm", "all_reduce", "float64", None), 1 + sum(r * r for r in ranks))
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, shape in enumerate(shapes):
        buckets.setdefault(shape, []).append(index)
    for shape, members in buckets.items():
        count, r = len(members), ranks[members[0]]
        add(("finite_entries", "all_reduce", "float32", shape), count)
        for _ in range(2):
            add(("cholesky_qr2", "all_reduce", "float32", shape), count * (2 * r) ** 2)
        bad = sum(i in zero_grad for i in members)
        if bad:
            padded_rows = -(-shape[0] // WORLD) * WORLD  # every rank's rows padded to the largest shard
            add(("cholesky_qr2", "all_gather", "float32", shape), bad * padded_rows * 2 * r)
        if nesterov:
            add(("nesterov_direction", "all_reduce", "float32", shape), count * 2 * r * r)
    return ledger


def expected_ledger(method: str, hidden: int, intermediate: int, kv: int, rank: int) -> Ledger:
    """The formula's ledger per step for one of METHODS (AdamW's optimizer communicates nothing)."""
    optimizer, nesterov, zero = METHODS[method]
    if optimizer == "adamw":
        return {}
    shapes = layer_matrix_shapes(hidden, intermediate, kv)
    return formula_ledger(shapes, rank, nesterov, tuple(i for i, name in enumerate(MATRICES) if name == zero))


def ledger_bytes(ledger: Ledger, keep: Callable[[tuple], bool] = lambda key: True) -> int:
    """Bytes of the ledger's entries that `keep` accepts."""
    return sum(numbers * _itemsize(key[2]) for key, (_, numbers) in ledger.items() if keep(key))


def first_step_gather_bytes(shapes: list[tuple[int, int]], itemsize: int = 4) -> int:
    """The first step's one-off: each rank all-gathers every W (in the weights' dtype) for its top-r SVD."""
    return itemsize * sum(m * n for m, n in shapes)


def fsdp2_bytes(hidden: int, intermediate: int, kv: int, itemsize: int) -> dict[str, int]:
    """FSDP2's own bytes per step for the layer and its gains: all-gathered in forward and again in backward
    (the layer reshards after forward), reduce-scattered once."""
    numel = sum(m * n for m, n in layer_matrix_shapes(hidden, intermediate, kv)) + 2 * hidden
    return {"all_gather": 2 * numel * itemsize, "reduce_scatter": numel * itemsize}


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


# ---------------------------------------------------------------------------------------------------- measuring
# CholeskyQR2's workers book under its name; comprehension frames (Python < 3.12) are looked through
_SITE_ALIASES = {
    "cholesky_qr2_panels": "cholesky_qr2",
    "householder_where": "cholesky_qr2",
    "_lookahead": "nesterov_direction",
}
_TRANSPARENT = {"<listcomp>", "<genexpr>", "<dictcomp>", "<setcomp>"}


def _issuer(frame) -> tuple[str, tuple[int, int] | None]:
    """The innermost mofasgd function (collective helpers skipped) above `frame`, and its bucket's global shape."""
    site, shape = "outside mofasgd", None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_name
        if module.startswith("mofasgd") and module not in (
            "mofasgd.sharding",
            "mofasgd.data_parallel",
            "mofasgd.distribution",
        ):
            if site == "outside mofasgd" and name not in _TRANSPARENT:
                site = _SITE_ALIASES.get(name, name)
            if name == "_bucket_step":
                shapes = sorted({tuple(p.shape) for p in frame.f_locals.get("params", ())})
                shape = shapes[0] if len(shapes) == 1 else ("mixed", *shapes)
                break
        frame = frame.f_back
    return site, shape


def _buffer(name: str, args: tuple, kwargs: dict) -> tuple[torch.dtype, int]:
    """(dtype, numbers) of the buffer a collective works on: the gathered result, a reduce-scatter's input."""
    tensors = list(args) + list(kwargs.values())
    if name == "all_gather":  # (output list, input)
        return tensors[0][0].dtype, sum(t.numel() for t in tensors[0])
    if name in ("reduce_scatter_tensor", "reduce_scatter_single"):  # (output, input)
        return tensors[1].dtype, tensors[1].numel()
    if name == "reduce_scatter":  # (output, input list)
        return tensors[1][0].dtype, sum(t.numel() for t in tensors[1])
    return tensors[0].dtype, tensors[0].numel()  # all_reduce, broadcast: the tensor; all_gather_*: the output


@contextmanager
def booking(ledger: Ledger) -> Iterator[None]:
    """Book every torch.distributed collective called inside the block under (issuer, op, dtype, shape)."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, original: Callable) -> Callable:
        def booked(*args, **kwargs):
            dtype, numbers = _buffer(name, args, kwargs)
            site, shape = _issuer(sys._getframe(1))
            entry = ledger.setdefault((site, name, str(dtype).removeprefix("torch."), shape), [0, 0])
            entry[0] += 1
            entry[1] += numbers
            return original(*args, **kwargs)

        return booked

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


_PROFILER_DTYPES = {"float": "float32", "double": "float64", "c10::BFloat16": "bfloat16", "c10::Half": "float16"}


def _event_bytes(event, index: int) -> int:
    dtype = event.input_dtypes[index]
    return math.prod(event.input_shapes[index]) * _itemsize(_PROFILER_DTYPES.get(dtype, dtype))


@contextmanager
def audit(totals: dict[str, int]) -> Iterator[None]:
    """Bytes of every collective gloo runs inside the block, by kind, whoever issued it.

    ``gloo_*``: what gloo ran (an all-reduce with its tensor, an all-gather with one rank's piece, so x W; gloo
    runs FSDP2's reduce-scatter as an all-reduce of the whole input). ``fsdp_*``: the c10d ops FSDP2 called.
    """
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield
    for event in prof.events():
        kind, size = None, 0
        if event.name.startswith("gloo:"):
            kind = "gloo_" + event.name.removeprefix("gloo:")
            size = _event_bytes(event, 0) * (WORLD if kind == "gloo_all_gather" else 1)
        elif event.name == "c10d::_allgather_base_":  # (output, input): the gathered output
            kind, size = "fsdp_all_gather", _event_bytes(event, 0)
        elif event.name == "c10d::_reduce_scatter_base_":  # (output, input): the whole input
            kind, size = "fsdp_reduce_scatter", _event_bytes(event, 1)
        if kind:
            totals[kind] = totals.get(kind, 0) + size


def gloo_bytes(totals: dict[str, int]) -> int:
    """All bytes gloo moved in a phase."""
    return sum(v for k, v in totals.items() if k.startswith("gloo_"))


def _zero_output_gradient(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook: the module's output keeps its value but passes back a zero gradient, so the module's weight
    gets a zero gradient and every other matrix the gradient it would have had."""
    output.register_hook(torch.zeros_like)


def _build(method: str, args: argparse.Namespace):
    from torch.distributed.fsdp import fully_shard

    optimizer_name, nesterov, zero = METHODS[method]
    torch.manual_seed(0)
    model = OneLayerModel(args.hidden, args.intermediate, args.kv)
    if zero is not None:
        getattr(model.layer, zero).register_forward_hook(_zero_output_gradient)
    fully_shard(model.layer)
    fully_shard(model)
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, optimizer, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    routing = split_for_mofasgd(model)
    groups = [{"params": [p for _, p in routing.mofasgd]}, {"params": [p for _, p in routing.adamw], "mofasgd": False}]
    optimizer = MoFaSGD(groups, lr=1e-4, rank=args.rank, nesterov=nesterov)
    return model, optimizer, lambda: optimizer.clip_grad_norm_(args.clip)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for method in args.methods:
            model, optimizer, clip = _build(method, args)
            steps = []
            for step in range(args.steps):
                x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1000 * step + rank))
                record = {phase: ({}, {}) for phase in PHASES}  # phase -> (ledger, audit)
                with audit(record["forward_backward"][1]), booking(record["forward_backward"][0]):
                    model(x).square().mean().backward()
                with audit(record["clip"][1]), booking(record["clip"][0]):
                    clip()
                with audit(record["step"][1]), booking(record["step"][0]):
                    optimizer.step()
                optimizer.zero_grad()
                steps.append(record)
            out[method] = steps
        results[rank] = out
    finally:
        dist.destroy_process_group()
    exit_spawned_worker()


def measure(
    hidden: int,
    intermediate: int,
    kv: int,
    rank: int,
    steps: int = 3,
    tokens: int = 16,
    clip: float = 1.0,
    methods: tuple[str, ...] = tuple(METHODS),
) -> dict[int, dict[str, list[dict]]]:
    """Train `methods` on 2 gloo processes: per rank, method and step, each phase's (ledger, audit)."""
    args = argparse.Namespace(
        hidden=hidden, intermediate=intermediate, kv=kv, rank=rank, steps=steps, tokens=tokens, clip=clip
    )
    args.methods = methods
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(WORLD, free_port(), args, results), nprocs=WORLD, join=True)
        return {r: results[r] for r in range(WORLD)}


def merge(*ledgers: Ledger) -> Ledger:
    """The sum of ledgers (clip_grad_norm_ and step of one step)."""
    total: Ledger = {}
    for ledger in ledgers:
        for key, (calls, numbers) in ledger.items():
            entry = total.setdefault(key, [0, 0])
            entry[0] += calls
            entry[1] += numbers
    return total


def optimizer_ledger(record: dict) -> Ledger:
    """What the optimizer's collectives booked in one step (clip_grad_norm_ + step)."""
    return merge(record["clip"][0], record["step"][0])


def check(measured: dict, hidden: int, intermediate: int, kv: int, rank: int) -> list[str]:
    """Every disagreement between the measurement and the formula; empty when they agree exactly.

    MoFaSGD, on every rank: each step after the first books exactly the formula's ledger; in every step gloo
    moved exactly what the ledger booked (the first step: plus the one-off all-gathers of W); forward + backward
    moved FSDP2's formula bytes and nothing that MoFaSGD issued. AdamW's step moves nothing.
    """
    problems = []
    shapes = layer_matrix_shapes(hidden, intermediate, kv)
    fsdp = fsdp2_bytes(hidden, intermediate, kv, 4)
    for r, per_method in measured.items():
        for method, steps in per_method.items():
            mofasgd = METHODS[method][0] == "mofasgd"
            expected = expected_ledger(method, hidden, intermediate, kv, rank)
            for index, record in enumerate(steps):
                where = f"rank {r}, {method}, step {index + 1}"
                moved = record["forward_backward"][1]
                if (moved.get("fsdp_all_gather"), moved.get("fsdp_reduce_scatter")) != tuple(fsdp.values()):
                    problems.append(f"{where}: FSDP2 moved {moved} in forward+backward, the formula says {fsdp}")
                if gloo_bytes(moved) != sum(fsdp.values()):
                    problems.append(f"{where}: gloo moved {gloo_bytes(moved)} B in forward+backward, not {fsdp}")
                if any(key[0] != "outside mofasgd" for key in record["forward_backward"][0]):
                    problems.append(f"{where}: MoFaSGD communicated during backward: {record['forward_backward'][0]}")
                if not mofasgd:
                    if record["step"][0] or gloo_bytes(record["step"][1]):
                        problems.append(f"{where}: AdamW's step communicated {record['step']}")
                    continue
                booked = optimizer_ledger(record)
                one_off = first_step_gather_bytes(shapes) if index == 0 else 0
                gloo = gloo_bytes(record["clip"][1]) + gloo_bytes(record["step"][1])
                if gloo != ledger_bytes(booked) + one_off:
                    problems.append(f"{where}: gloo moved {gloo} B in clip+step, the ledger {ledger_bytes(booked)} B")
                for key in sorted(set(booked) | set(expected), key=str):
                    if booked.get(key) != expected.get(key):
                        problems.append(
                            f"{where}: {key} booked [calls, numbers] {booked.get(key)}, formula {expected.get(key)}"
                        )
    return problems


# ---------------------------------------------------------------------------------------------------- report
def _bucket_names(shapes: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    names: dict[tuple[int, int], list[str]] = {}
    for name, shape in zip(MATRICES, shapes):
        names.setdefault(shape, []).append(name.removesuffix("_proj"))
    return {shape: ", ".join(n) for shape, n in names.items()}


def _fmt(numbers: int) -> str:
    return f"{numbers:,}"


def _mib(numbers: int) -> str:
    return f"{numbers / 2**20:.2f} MiB" if numbers >= 2**20 else f"{numbers / 2**10:.1f} KiB"


def report(measured: dict, args: argparse.Namespace, problems: list[str]) -> str:
    """The markdown report: rank 0's step 2, and what check() found comparing every rank and step."""
    h, i, kv, r = args.hidden, args.intermediate, args.kv, args.rank
    shapes = layer_matrix_shapes(h, i, kv)
    names = _bucket_names(shapes)
    runs = measured[0]
    lines = [
        "# MoFaSGD's own communication per step under FSDP2",
        "",
        f"`python -m benchmarks.fsdp2_communication --hidden {h} --intermediate {i} --kv {kv} --rank {r} "
        f"--steps {args.steps} --tokens {args.tokens}`",
        "",
        f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}), 2 processes on the gloo backend, torch "
        f"{torch.__version__}. One LLaMA decoder layer (hidden {h}, MLP {i}, kv {kv}: llama_layer's "
        "LlamaLayerMatrices with K and V used per feature, since there K and V only enter through a sum of their "
        "outputs, which makes their gradients rank 1 and sends CholeskyQR2 to its gathered fallback every step; "
        "its seven matrices go to "
        f"MoFaSGD at rank {r}, its two RMSNorm gains to MoFaSGD's AdamW side), fp32 weights, `fully_shard` on the "
        f"layer and on the root, {args.tokens} tokens per rank, {args.steps} steps of forward + backward, "
        "`clip_grad_norm_(1.0)`, `step()`. Collectives are booked by wrapping `torch.distributed`'s functions and "
        "audited with torch.profiler (every byte gloo moved); bytes = the buffer a collective works on "
        "(all-reduce: its tensor; all-gather: the gathered result; reduce-scatter: its whole input).",
        "",
        (
            "Checked: on both ranks, every step after the first books exactly the formula's collectives (calls "
            "and numbers, per issuing function, dtype and matrix shape), and gloo moved nothing else; the tables "
            "show step 2."
            if not problems
            else "**The measurement differs from the formula:**\n\n" + "\n".join(f"* {p}" for p in problems)
        ),
        "",
        "## Optimizer collectives per step (clip_grad_norm_ + step), measured vs formula",
        "",
        "| matrices | shape m x n | collectives | MoFaSGD calls | formula bytes | measured bytes "
        "| + Nesterov calls | formula bytes | measured bytes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    ledgers = {
        method: (expected_ledger(method, h, i, kv, r), optimizer_ledger(runs[method][1]))
        for method in ("mofasgd", "mofasgd_nesterov")
    }

    def row(label: str, shape: str, what: str, keep: Callable[[tuple], bool]) -> str:
        cells = []
        for formula, booked in ledgers.values():
            calls = sum(c for key, (c, _) in booked.items() if keep(key))
            cells += [str(calls), _fmt(ledger_bytes(formula, keep)), _fmt(ledger_bytes(booked, keep))]
        return f"| {label} | {shape} | {what} | " + " | ".join(cells) + " |"

    for shape, label in names.items():
        what = "non-finite flags (B), 2 Grams (B (2r)^2) [+ Nesterov B 2r r], fp32"
        lines.append(row(label, f"{shape[0]} x {shape[1]}", what, lambda key, s=shape: key[3] == s))
    lines.append(
        row("all 7", "", "G^T U shares + seen flags, n r + 1 each, fp32", lambda key: key[0] == "synchronize")
    )
    lines.append(row("all 7 + gains", "", "grad norm: 1 + r^2 each, fp64", lambda key: key[0] == "grad_norm"))
    lines.append(row("**layer**", "", "**total**", lambda key: True))

    fsdp = fsdp2_bytes(h, i, kv, 4)
    zero = runs["mofasgd_zero_grad_v"][1]
    kv_shape = shapes[1]
    gather = ledger_bytes(optimizer_ledger(zero), lambda key: key[1] == "all_gather")
    formula_gather = ledger_bytes(expected_ledger("mofasgd_zero_grad_v", h, i, kv, r), lambda k: k[1] == "all_gather")
    lines += [
        "",
        "Fallback (`mofasgd_zero_grad_v`: v_proj's output passes back a zero gradient, so v_proj's gradient is "
        "zero and its [U | G V] panel rank-deficient): CholeskyQR2 then all-gathers, every step, v's panel only "
        f"(of the {kv_shape[0]} x {kv_shape[1]} bucket; m 2r fp32): measured {_fmt(gather)} B, formula "
        f"{_fmt(formula_gather)} B, on top of the table's collectives.",
        "",
        "## Everything each step moves (bytes, rank 0)",
        "",
        "| method | FSDP2 all-gather (fwd + bwd) | FSDP2 reduce-scatter | clip_grad_norm_ | step | first step, "
        "clip + step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in runs:
        first, later = runs[method][0], runs[method][1]
        moved = later["forward_backward"][1]
        cells = [
            _fmt(moved.get("fsdp_all_gather", 0)),
            _fmt(moved.get("fsdp_reduce_scatter", 0)),
            _fmt(gloo_bytes(later["clip"][1])),
            _fmt(gloo_bytes(later["step"][1])),
            _fmt(gloo_bytes(first["clip"][1]) + gloo_bytes(first["step"][1])),
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    one_off = first_step_gather_bytes(shapes)
    lines += [
        "",
        f"FSDP2's formula: all-gather 2 x 4 x (sum m n + 2 hidden) = {_fmt(fsdp['all_gather'])}, reduce-scatter "
        f"{_fmt(fsdp['reduce_scatter'])}, the same for both optimizers. AdamW's clip is torch's "
        "`clip_grad_norm_` on DTensor gradients (its own small all-reduce); AdamW's step moves nothing. "
        f"MoFaSGD's first step also all-gathers every fp32 W once to factor it (4 x sum m n = {_fmt(one_off)} B; "
        "DTensor.full_tensor, a functional collective only the audit sees).",
        "",
        "## Formula, extrapolated to real layers (bf16 weights and gradients, fp32 factors)",
        "",
        "| layer (hidden / MLP / kv) | rank | MoFaSGD bytes/step | + Nesterov | FSDP2 bf16 reduce-scatter | "
        "reduce-scatter / MoFaSGD | FSDP2 bf16 all-gather (fwd + bwd) | first-step one-off (bf16 W) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    layers = [("this run (fp32)", {"hidden": h, "intermediate": i, "kv": kv}, 4)]
    layers += [("LLaMA-3.1-8B", LLAMA_8B, 2), ("LLaMA-3.1-70B", LLAMA_70B, 2)]
    for label, dims, item in layers:
        hh, ii, kk = dims["hidden"], dims["intermediate"], dims["kv"]
        layer = layer_matrix_shapes(hh, ii, kk)
        plain = ledger_bytes(formula_ledger(layer, r))
        nesterov = ledger_bytes(formula_ledger(layer, r, nesterov=True))
        f2 = fsdp2_bytes(hh, ii, kk, item)
        cells = [
            f"{label} {hh} / {ii} / {kk}",
            str(r),
            f"{_fmt(plain)} ({_mib(plain)})",
            f"{_fmt(nesterov)} ({_mib(nesterov)})",
            f"{_fmt(f2['reduce_scatter'])} ({_mib(f2['reduce_scatter'])})",
            f"{f2['reduce_scatter'] / plain:,.0f}x",
            _mib(f2["all_gather"]),
            _mib(first_step_gather_bytes(layer, item)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Formula per step, for the managed m x n matrices of the layer (r = min(rank, m, n)), B = matrices per shape:",
        "",
        "* `synchronize` (gradient intake): 1 all-reduce, fp32, sum over matrices of (n r + 1) (G^T U share, flag);",
        "* `grad_norm` (clip_grad_norm_): 1 all-reduce, fp64, 1 + sum of r^2 (squared-norm shares, U^T G V shares);",
        "* per shape bucket: 1 all-reduce of B fp32 non-finite flags, 2 of B (2r)^2 fp32 Grams (CholeskyQR2), with "
        "Nesterov 1 of B 2r r fp32; only when a panel of the bucket is ill-conditioned (zero or rank-deficient "
        "gradient), 1 all-gather of those panels (m 2r fp32 each).",
        "",
        "Bytes per matrix: 4 (n r + 1) + 8 r^2 + 4 (1 + 8 r^2) [+ 8 r^2 with Nesterov], plus 8 per step. Over a "
        "whole model the matrices of all layers share the buckets (one per distinct shape), so the number of calls "
        "per step (2 + 3 per shape, + 1 per shape with Nesterov: 14 or 18 for LLaMA) does not grow with depth; "
        "the bytes per layer stay as above.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--kv", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per rank (>= rank, so G V has full rank)")
    parser.add_argument("--output", help="also write the markdown report to this file")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is reported apart")
    args.clip = 1.0
    measured = measure(args.hidden, args.intermediate, args.kv, args.rank, args.steps, args.tokens, args.clip)
    problems = check(measured, args.hidden, args.intermediate, args.kv, args.rank)
    text = report(measured, args, problems)
    print(text, end="")
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    if problems:
        raise SystemExit("measured collectives differ from the formula:\n" + "\n".join(problems))


if __name__ == "__main__":
    main()
