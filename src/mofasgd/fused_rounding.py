"""The stochastically rounded low-rank update in one compiled pass, its random bits a hash of each entry's index.

The eager bf16 update (:mod:`mofasgd.rounding`) makes about seven passes over each fp32 chunk (bf16 -> fp32, the
decay, the rank-k product, the generator's random words, their lanes to int32, the add, the high-half store), and
the CPU's mt19937 generator runs on one thread. Here the 16 random bits of an entry are a counter-based hash of
its flat index and of one seed per matrix and step (drawn from the optimizer's generator, so resumes and
data-parallel replicas stay exact), which `torch.compile` (inductor: C++/OpenMP on the CPU, Triton on CUDA)
fuses with the update into the product and one elementwise pass: no random tensor exists. The bits depend only
on (seed, index), so :func:`counter_bits` in eager torch and the compiled kernel draw the same ones.

The AdamW side's bf16 parameters and moments get the same treatment (:func:`adamw_update_`). The kernels are
``"eager"`` (mofasgd.rounding), ``"compiled"`` (this module) and ``"auto"`` (compiled on CUDA, eager on the CPU,
where compiling costs seconds per process and rank, and pure bf16 is a test setting).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

from mofasgd.options import ROUNDING_KERNELS
from mofasgd.rounding import as_rows, row_chunks

logger = logging.getLogger("mofasgd")

_LOW_BITS = 1 << 16  # the fp32 bits below bf16's mantissa
# A 32-bit integer finaliser (xor-shift-multiply; constants from Wellons' hash-prospector search, which rates it
# low-bias), in int32 arithmetic: multiplication wraps modulo 2**32 and the logical shifts are masked arithmetic ones.
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_SHIFTS = (16, 15, 15)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int32 values (torch's >> is arithmetic: the sign bit's copies are masked off)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective scramble of 32-bit values held in int32 (each output bit depends on every input bit)."""
    x = x ^ _shift_right(x, _SHIFTS[0])
    x = x * _MULTIPLIERS[0]
    x = x ^ _shift_right(x, _SHIFTS[1])
    x = x * _MULTIPLIERS[1]
    return x ^ _shift_right(x, _SHIFTS[2])


def _bits_of(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """16 random bits (int32 in [0, 2**16)) for each int32 flat index under an int32 seed: two mixing rounds."""
    return _mix32(_mix32(index) ^ seed) & (_LOW_BITS - 1)


def _wrapped(offset: int) -> int:
    """`offset` modulo 2**32 as a signed 32-bit value (indices of matrices beyond 2**31 entries wrap)."""
    return (offset + (1 << 31)) % (1 << 32) - (1 << 31)


def counter_bits(seed: torch.Tensor, offset: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The bits the compiled kernel adds to the entries offset, offset + 1, ... of a matrix (row-major), eagerly."""
    count = 1
    for size in shape:
        count *= size
    index = torch.arange(count, dtype=torch.int32, device=device).view(shape) + _wrapped(offset)
    return _bits_of(index, seed.to(device, torch.int32))


def draw_seed(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One 32-bit seed (an int32 device scalar) from the optimizer's generator: a matrix's bits for one step."""
    return torch.randint(-(1 << 31), 1 << 31, (), dtype=torch.int32, device=device, generator=generator)


def _round_into_(target: torch.Tensor, value: torch.Tensor, bits: torch.Tensor) -> None:
    """Store fp32 `value` into bf16 `target`, rounded stochastically with `bits` (int32 in [0, 2**16))."""
    rounded = (value.view(torch.int32) + bits) & ~(_LOW_BITS - 1)  # bf16's 16 high bits
    target.copy_(rounded.view(torch.float32).to(torch.bfloat16))  # exact: the low 16 bits are zero


def _update_rows(
    rows: torch.Tensor,
    left: torch.Tensor,
    right_t: torch.Tensor,
    alpha: torch.Tensor,
    decay: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> None:
    """Set rows to stochastic_round(decay rows + alpha left right_t): bf16 rows, fp32 arithmetic, hashed bits.

    The rank-k product is written as k outer-product terms, so the compiler fuses it into the one elementwise
    pass (no m x n product buffer; left's k columns and right_t's k rows are all it reads besides the rows).
    ``offset`` is the flat index of rows[0, 0] in its matrix, so every entry of the matrix draws its own bits.
    """
    product = left[:, :1] * right_t[:1]
    for j in range(1, left.shape[1]):
        product = product + left[:, j : j + 1] * right_t[j : j + 1]
    value = rows.float() * decay + product * alpha
    index = torch.arange(value.numel(), dtype=torch.int32, device=value.device).view(value.shape) + offset
    _round_into_(rows, value, _bits_of(index, seed))


def _adamw_rows(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    scalars: torch.Tensor,
    allowed: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> None:
    """One AdamW step (torch's formulas) on bf16 param, exp_avg, exp_avg_sq in fp32, each stored with the same bits.

    `scalars` = (1 - beta1, beta2, 1 - beta2, step size lr / (1 - beta1^t), sqrt(1 - beta2^t), eps, decay
    1 - lr wd) as one fp32 device vector; where the bool device scalar `allowed` is false nothing changes.
    """
    one_minus_beta1, beta2, one_minus_beta2, step_size, bias2_sqrt, eps, decay = scalars.unbind(0)
    g = torch.where(allowed, grad.float(), 0.0)  # a skipped step's gradient may be non-finite
    m_old, v_old, w_old = exp_avg.float(), exp_avg_sq.float(), param.float()
    m = m_old + (g - m_old) * one_minus_beta1
    v = v_old * beta2 + g * g * one_minus_beta2
    w = w_old * decay - step_size * m / (v.sqrt() / bias2_sqrt + eps)
    index = torch.arange(w.numel(), dtype=torch.int32, device=w.device).view(w.shape) + offset
    bits = _bits_of(index, seed)  # shared by the three stores: each stays unbiased (as the eager side shares noise)
    _round_into_(exp_avg, torch.where(allowed, m, m_old), bits)
    _round_into_(exp_avg_sq, torch.where(allowed, v, v_old), bits)
    _round_into_(param, torch.where(allowed, w, w_old), bits)


_compiled: dict[str, Callable[..., None]] = {}


def _compile(function: Callable[..., None]) -> Callable[..., None]:
    """`function` compiled once per process (dynamic shapes: one graph serves every tensor and chunk)."""
    name = function.__name__
    if name not in _compiled:
        _compiled[name] = torch.compile(function, dynamic=True, fullgraph=True)
    return _compiled[name]


def _kernel() -> Callable[..., None]:
    """The compiled matrix update (`_update_rows`)."""
    return _compile(_update_rows)


def _adamw_kernel() -> Callable[..., None]:
    """The compiled AdamW-side update (`_adamw_rows`)."""
    return _compile(_adamw_rows)


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int | torch.Tensor,
    settings: tuple,
    generator: torch.Generator,
    allowed: torch.Tensor | None = None,
    kernel: Callable[..., None] | None = None,
) -> None:
    """One AdamW step (torch's) for a bf16 parameter and bf16 moments, rounded stochastically, in compiled chunks.

    The same formulas as :func:`mofasgd.adamw_side.adamw_update_fp32_` (`step` counts this one; `settings` its
    AdamSettings), one pass per chunk. `allowed` (capturable): a device flag; `step` and the learning rate may
    then be device tensors.
    """
    kernel = kernel or _adamw_kernel()
    lr, beta1, beta2, eps, weight_decay = settings
    device = param.device

    def scalar(value: float | torch.Tensor) -> torch.Tensor:  # a fill, not a host-to-device copy (capturable)
        if torch.is_tensor(value):
            return value.to(device, torch.float32)
        return torch.full((), float(value), dtype=torch.float32, device=device)

    step_t, lr_t = scalar(step), scalar(lr)
    scalars = torch.stack(
        [
            scalar(1.0 - beta1),
            scalar(beta2),
            scalar(1.0 - beta2),
            lr_t / (1.0 - beta1**step_t),
            (1.0 - beta2**step_t).sqrt(),
            scalar(eps),
            1.0 - lr_t * weight_decay,
        ]
    )
    ok = torch.ones((), dtype=torch.bool, device=device) if allowed is None else allowed.to(device)
    seed = draw_seed(generator, device)
    views = [as_rows(t) for t in (param, grad, exp_avg, exp_avg_sq)]
    rows, cols = views[0].shape
    for start, stop in row_chunks(rows, cols):
        offset = torch.full((), _wrapped(start * cols), dtype=torch.int32, device=device)
        kernel(*(view[start:stop] for view in views), scalars, ok, seed, offset)


def low_rank_update_(
    param: torch.Tensor,
    left: torch.Tensor,
    right_t: torch.Tensor,
    alpha: float | torch.Tensor,
    decay: torch.Tensor | None,
    generator: torch.Generator,
    kernel: Callable[..., None] | None = None,
) -> None:
    """W <- stochastic_round(decay W + alpha left right_t) for a bf16 matrix, in row chunks, in place.

    `left` (m x k) and `right_t` (k x n) are fp32; `alpha` a number or device scalar, `decay` a device scalar
    or None. The chunks bound the transient memory (the product's fp32 block) as the eager path does. `kernel`
    defaults to the compiled one; :func:`_update_rows` itself is the eager reference.
    """
    kernel = kernel or _kernel()
    device = param.device
    scalar = torch.ones((), dtype=torch.float32, device=device)
    alpha_t = alpha.to(device, torch.float32) if torch.is_tensor(alpha) else scalar * alpha
    decay_t = scalar if decay is None else decay.to(device, torch.float32)
    seed = draw_seed(generator, device)
    right_t = right_t.contiguous()
    rows, cols = param.shape
    for start, stop in row_chunks(rows, cols):
        offset = torch.full((), _wrapped(start * cols), dtype=torch.int32, device=device)
        kernel(param[start:stop], left[start:stop].contiguous(), right_t, alpha_t, decay_t, seed, offset)


class KernelChoice:
    """Which update kernel each device uses, resolved at its first bf16 step: the option, or `auto`'s pick.

    A compiled kernel that cannot be built is an error when asked for by name; under ``auto`` it is said once in
    the log and the eager kernel is used for the rest of the run (the same unbiased rounding, other bits).
    """

    def __init__(self, option: str) -> None:
        if option not in ROUNDING_KERNELS:
            raise ValueError(f"rounding_kernel must be one of {ROUNDING_KERNELS}, got {option!r}")
        self.option = option
        self._by_device: dict[str, str] = {}

    def compiled(self, device: torch.device) -> bool:
        """Whether matrices on `device` take the compiled kernel (probing the compiler once per device type)."""
        key = device.type
        if key not in self._by_device:
            wanted = self.option == "compiled" or (self.option == "auto" and key == "cuda")
            self._by_device[key] = self._probe(device) if wanted else "eager"
        return self._by_device[key] == "compiled"

    def resolved(self) -> dict[str, str]:
        """The kernel per device type met so far (for diagnostics and the log)."""
        return dict(self._by_device)

    def _probe(self, device: torch.device) -> str:
        """Compile and run both kernels on 4 x 8 tensors on `device`: "compiled", or "eager" under auto."""
        logger.info("MoFaSGD: compiling the fused stochastic-rounding update for %s (once per process)", device)
        try:
            probe = torch.zeros(4, 8, dtype=torch.bfloat16, device=device)
            factor = torch.ones(4, 2, device=device)
            generator = torch.Generator(device=device).manual_seed(0)
            low_rank_update_(probe, factor, torch.ones(2, 8, device=device), 0.5, None, generator)
            if not torch.equal(probe.float(), torch.full_like(probe.float(), 1.0)):  # 0.5 * 2 exactly, any bits
                raise RuntimeError(f"the compiled kernel computed {probe.float().flatten().tolist()} for all 1.0")
            side = [torch.zeros(4, 8, dtype=torch.bfloat16, device=device) for _ in range(4)]
            side[1].fill_(1.0)  # the gradient: AdamW's first step moves every entry by -lr (here 0.5)
            adamw_update_(*side, 1, (0.5, 0.9, 0.999, 1e-8, 0.0), generator)
            if not torch.allclose(side[0].float(), torch.full_like(side[0].float(), -0.5), atol=0.01):
                raise RuntimeError(f"the compiled AdamW kernel gave {side[0].float().flatten().tolist()}, not -0.5")
        except Exception as error:  # the compiler's failures have no common type (missing C++ compiler, Triton)
            if self.option == "compiled":
                raise RuntimeError(
                    f"rounding_kernel='compiled' (YAML mfsgd_rounding_kernel: compiled) could not build the fused "
                    f"stochastic-rounding update on {device}: {type(error).__name__}: {error}. Use "
                    "rounding_kernel='eager' (or 'auto'), or install what torch.compile needs (a C++ compiler on "
                    "the CPU, Triton on CUDA)."
                ) from error
            warnings.warn(
                f"MoFaSGD rounding_kernel='auto': the compiled stochastic-rounding update does not build on {device} "
                f"({type(error).__name__}: {error}); using the eager kernel (same unbiased rounding, slower). Set "
                "rounding_kernel='eager' to silence this.",
                stacklevel=3,
            )
            return "eager"
        return "compiled"
