"""Stochastic rounding of fp32 values into bf16 tensors, in bounded chunks, from the optimizer's own generator.

A bf16 weight keeps 8 significant bits: an update below half an ulp (|w| * 2**-9) is lost by round-to-nearest.
MoFaSGD's rank-r step spreads lr * ||s_hat|| over all m * n entries, so at fine-tuning learning rates almost
every entry's change is far below that and pure-bf16 training would not move the weights. Rounding up with
probability equal to the discarded fraction (add 16 uniform random bits to the fp32 bit pattern, then drop
the low 16 bits) makes the expected bf16 result equal the fp32 value, at no persistent memory cost.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

# Elements per chunk: the transient memory of one chunk is CHUNK_ELEMENTS * (4 B fp32 value + 4 B random bits).
CHUNK_ELEMENTS = 1 << 22
_LOW_BITS = 1 << 16
# where an fp32's high 16 bits (sign, exponent, 7 mantissa bits: its bf16 truncation) sit among its two halves
_HIGH_HALF = 1 if sys.byteorder == "little" else 0


def supports_stochastic_rounding(dtype: torch.dtype) -> bool:
    """Stochastic rounding is implemented for bf16 targets (the bf16 bit pattern is the top half of fp32's)."""
    return dtype == torch.bfloat16


def random_low_bits(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform random integers in [0, 2**16) shaped like `like`: the bits one stochastic rounding consumes.

    On the CPU they are drawn as full-range 64-bit words, each split into four 16-bit lanes: a full-range draw
    needs no reduction modulo a range and one draw serves four entries, ~7x cheaper than ``randint`` per entry
    on the mt19937 generator, whose cost was most of a pure-bf16 step (results/projected_backward.md). Elsewhere
    (Philox on CUDA, nearly free next to memory traffic) one ``randint`` keeps the op count per chunk at one.
    """
    if like.device.type != "cpu":
        return torch.randint(0, _LOW_BITS, like.shape, dtype=torch.int32, device=like.device, generator=generator)
    count = like.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64)
    words.random_(-(1 << 63), None, generator=generator)
    return words.view(torch.uint16)[:count].to(torch.int32).view(like.shape)


def stochastic_round_(
    target: torch.Tensor, value: torch.Tensor, generator: torch.Generator, noise: torch.Tensor | None = None
) -> None:
    """Write fp32 `value` into bf16 `target`, rounding each entry up or down so that E[target] == value.

    `value` is consumed (its bits are overwritten: it no longer holds the value, nor the rounded one). Both must
    have the same shape; `value` must be contiguous.
    `noise` (from :func:`random_low_bits`) may be shared by several tensors rounded together (a parameter and
    its moments): each stays unbiased, and drawing the bits once is most of the cost on a CPU.
    """
    if value.dtype != torch.float32 or target.dtype != torch.bfloat16:
        raise TypeError(f"stochastic_round_ needs fp32 -> bf16, got {value.dtype} -> {target.dtype}")
    bits = value.view(torch.int32)
    bits.add_(random_low_bits(value, generator) if noise is None else noise)
    # the high halves are the truncated bf16 values: one strided copy, no mask pass and no conversion
    target.copy_(value.view(-1).view(torch.bfloat16)[_HIGH_HALF::2].view(target.shape))


def store_(
    target: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None = None
) -> None:
    """Write an fp32 result back into `target`.

    Nothing to do when `value` is `target` itself (fp32 storage); rounded stochastically into bf16 when
    `generator` is given, else rounded to nearest.
    """
    if value.data_ptr() == target.data_ptr():
        return
    if generator is not None and supports_stochastic_rounding(target.dtype):
        stochastic_round_(target, value.contiguous(), generator, noise)
    else:
        target.copy_(value)


def row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of at most CHUNK_ELEMENTS elements each (at least one row per chunk)."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D view of `tensor` for row chunking: matrices as they are, anything else as one column."""
    return tensor if tensor.dim() == 2 else tensor.view(-1, 1)


def update_in_fp32_(
    param: torch.Tensor,
    compute: Callable[[torch.Tensor, int, int, torch.Tensor | None], None],
    generator: torch.Generator | None,
) -> None:
    """Apply an in-place fp32 update to a low-precision parameter, chunk by chunk (bounded transient memory).

    ``compute(buffer, start, stop, noise)`` updates ``buffer``, the fp32 copy of rows start:stop of
    ``as_rows(param)``, in place; the result is written back with stochastic rounding when `generator` is
    given (with ``noise``, this chunk's random bits, which `compute` may reuse for tensors it rounds), else
    rounded to nearest (``noise`` is None). At most CHUNK_ELEMENTS elements (plus one row) are held at a time.
    """
    view = as_rows(param)
    for start, stop in row_chunks(*view.shape):
        block = view[start:stop]
        buffer = block.float()
        noise = random_low_bits(buffer, generator) if generator is not None else None
        compute(buffer, start, stop, noise)
        store_(block, buffer, generator, noise)


def update_in_place_(
    param: torch.Tensor,
    compute: Callable[[torch.Tensor, int, int, torch.Tensor | None], None],
    generator: torch.Generator | None,
) -> None:
    """The one store of an in-place update: `compute` on `param` itself, or on fp32 chunks rounded stochastically.

    Without a generator ``compute(rows, 0, m, None)`` works on ``as_rows(param)`` in its own dtype; with one, on
    :func:`update_in_fp32_`'s fp32 chunks (bounded transient memory), each rounded stochastically on its way back.
    """
    if generator is None:
        view = as_rows(param)
        compute(view, 0, view.shape[0], None)
    else:
        update_in_fp32_(param, compute, generator)


class GeneratorBank:
    """One torch.Generator per device type, seeded from one seed, whose states travel with the optimizer state.

    Data-parallel replicas built with the same seed draw identical bits in the same order, so their bf16
    weights stay identical; saving and restoring the states makes a resumed run bit-exact.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Generator:
        """The generator for `device`'s type, created (or restored from a loaded state) on first use."""
        key = device.type
        if key not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            if key in self._pending_states:
                generator.set_state(self._pending_states.pop(key))
            self._generators[key] = generator
        return self._generators[key]

    def state(self) -> dict[str, torch.Tensor]:
        """Generator states by device type (uint8 tensors on the CPU; loadable with weights_only=True)."""
        states = {key: g.get_state() for key, g in self._generators.items()}
        states.update({k: v for k, v in self._pending_states.items() if k not in states})
        return states

    def load(self, states: dict[str, torch.Tensor]) -> None:
        """Restore saved generator states (applied now, or when the device's generator is first created)."""
        for key, value in states.items():
            value = value.to("cpu", torch.uint8)
            if key in self._generators:
                self._generators[key].set_state(value)
            else:
                self._pending_states[key] = value
