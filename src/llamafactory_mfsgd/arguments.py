"""YAML keys added to LLaMA-Factory's FinetuningArguments: MoFaSGD (`use_mfsgd`, `mfsgd_*`), profiling, fused GaLore.

The key names follow the authors' LLaMA-Factory fork so their configs run unchanged: that is why the keys say
`mfsgd` and the optimizer package says `mofasgd`. Every `mfsgd_<option>` key is the optimizer's option `<option>`
(:mod:`mofasgd.options`, the one table): its default and help come from there, :func:`optimizer_options` hands the
values to the optimizer. The keys are checked elsewhere: their types and spelling on the raw config
(:mod:`.key_types`), their values and engines at parse time (:mod:`.checks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from mofasgd import ADAMW_STATES, DEFAULTS, INITS
from mofasgd.options import OPTION, ROUNDING_KERNELS

from .baselines import BaselineArguments

# MoFaSGD options that no `mfsgd_*` key sets: the run's training arguments give them (`learning_rate_mfsgd` or
# `learning_rate`, `weight_decay`, `adam_beta1/2`, `adam_epsilon`, the world size, `seed`).
FROM_TRAINING_ARGUMENTS = ("lr", "weight_decay", "adam_betas", "adam_eps", "data_parallel", "seed")


def _option(name: str) -> Any:
    """A field for MoFaSGD's constructor option `name`: its default and help (mofasgd.options)."""
    return field(default=OPTION[name].default, metadata={"help": OPTION[name].help})


@dataclass
class MfsgdArguments:
    """Arguments selecting and configuring the MoFaSGD optimizer."""

    use_mfsgd: bool = field(
        default=False,
        metadata={"help": "Train with MoFaSGD: rank-r factored momentum for hidden matrices, AdamW for the rest."},
    )
    learning_rate_mfsgd: float | None = field(
        default=None, metadata={"help": "Learning rate of the MoFaSGD matrices (default: `learning_rate`)."}
    )
    learning_rate_adamw: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the AdamW parameters: embeddings, LM head, norms (default: `learning_rate`)."
        },
    )
    mfsgd_rank: int = _option("rank")
    mfsgd_beta: float = _option("beta")
    mfsgd_beta_start: float | None = _option("beta_start")
    mfsgd_beta_end: float | None = _option("beta_end")
    mfsgd_beta_warmup_steps: int = _option("beta_warmup_steps")
    mfsgd_eta1: float = _option("eta1")
    mfsgd_eta2: float = _option("eta2")
    mfsgd_eps: float = _option("eps")
    mfsgd_max_value: float = _option("max_value")
    mfsgd_min_gradient_support: float = _option("min_gradient_support")
    mfsgd_use_ones_for_nonzero_s: bool = _option("use_ones_for_nonzero_s")
    mfsgd_use_current_projection: bool = _option("use_current_projection")
    mfsgd_nesterov: bool = _option("nesterov")
    mfsgd_init: Literal[INITS] = _option("init")
    mfsgd_fused: bool = _option("fused")
    mfsgd_fused_adamw_side: bool = _option("fused_adamw_side")
    mfsgd_projected_backward: bool = _option("projected_backward")
    mfsgd_capturable: bool = _option("capturable")
    mfsgd_target: str = field(
        default="all",
        metadata={
            "help": "Module names routed to MoFaSGD, comma-separated, or `all` (every 2-D hidden weight and every MoE "
            "expert, each expert a matrix; `experts` names the experts alone). The input embeddings, LM head and MoE "
            "routers join only when named: `all,embed_tokens,lm_head` (LoRA-level memory), `all,gate`."
        },
    )
    mfsgd_adamw_state: Literal[ADAMW_STATES] = _option("adamw_state")
    mfsgd_adamw_side: Literal["authors", "compact"] | None = field(
        default=None,
        metadata={
            "help": "Preset of the two AdamW-side keys: `compact` = `mfsgd_adamw_state: factored_no_momentum` + "
            "`mfsgd_fused_adamw_side: true` (LoRA-level memory; the shipped 8B config), `authors` = `full` + "
            "`false` (the authors' AdamW side). Unset: the two keys as given."
        },
    )
    mfsgd_stochastic_rounding: bool | None = _option("stochastic_rounding")
    mfsgd_rounding_kernel: Literal[ROUNDING_KERNELS] = _option("rounding_kernel")


# `mfsgd_<option>` key -> MoFaSGD constructor option, for every option a key sets.
OPTION_OF_KEY = {
    f"mfsgd_{name}": name for name in DEFAULTS if f"mfsgd_{name}" in {f.name for f in fields(MfsgdArguments)}
}


def optimizer_options(args: Any) -> dict[str, Any]:
    """MoFaSGD's constructor options from the `mfsgd_*` keys of `args` (the other options: FROM_TRAINING_ARGUMENTS)."""
    return {option: getattr(args, key) for key, option in OPTION_OF_KEY.items()}


@dataclass
class ProfileMemoryArguments:
    """Arguments of the PyTorch memory-snapshot callback."""

    profile_memory_from_start: bool = field(
        default=False, metadata={"help": "Record allocator history from before model load and dump a snapshot."}
    )
    profile_memory_stop_step: int | None = field(
        default=1,
        metadata={"help": "Optimizer steps after which the snapshot is written and recording stops (null: 1)."},
    )
    profile_memory_stop_accumulation_step: int | None = field(
        default=0,
        metadata={"help": "If > 0, stop after this many micro-steps of the first optimizer step instead (null: 0)."},
    )
    profile_memory_max_entries: int | None = field(
        default=1_000_000, metadata={"help": "Allocator events kept in the CUDA history ring buffer (null: 1e6)."}
    )


@dataclass
class GaloreFusedArguments:
    """The fused GaLore baseline: projection of each gradient in a backward hook (needs `use_galore`)."""

    galore_fused: bool = field(
        default=False, metadata={"help": "Project GaLore gradients in a backward hook and free the full gradient."}
    )


EXTENSION_DATACLASSES = (MfsgdArguments, ProfileMemoryArguments, GaloreFusedArguments, BaselineArguments)


def extension_field_names() -> set[str]:
    """All YAML keys this extension adds."""
    return {f.name for cls in EXTENSION_DATACLASSES for f in fields(cls)}


# `mfsgd_adamw_side` presets -> the (mfsgd_adamw_state, mfsgd_fused_adamw_side) they stand for
ADAMW_SIDE_PRESETS = {"authors": ("full", False), "compact": ("factored_no_momentum", True)}
