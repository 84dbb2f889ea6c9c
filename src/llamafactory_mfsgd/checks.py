"""Parse-time checks of the extension's keys: values, cross-field rules, engines and the checkpoint to resume.

Checks that need only the keys run in ``FinetuningArguments.__post_init__`` (:func:`validate_extension_values`);
those of the raw config (keys a run would ignore, the AdamW-side preset written beside its keys, DeepSpeed and
FSDP1) before LLaMA-Factory's parser builds the training arguments; those that also need the training arguments
(FSDP2, fp16, world size, the checkpoint directory) in :func:`validate_with_training_args`. MoFaSGD's own option
rules come from :mod:`mofasgd.options`: its errors name the option, mapped here to the YAML key.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from mofasgd import DEFAULTS as OPTIMIZER_DEFAULTS
from mofasgd import OptionError, validate
from mofasgd.options import OPTION, check_engine

from .activation import env_flag
from .arguments import ADAMW_SIDE_PRESETS, OPTION_OF_KEY, optimizer_options
from .baselines import validate_baseline_values
from .config_values import is_set
from .key_types import check_extension_types, extension_fields, fill_null_defaults, yaml_text


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"Invalid `{key}: {value!r}` in the MoFaSGD config: expected {expected}.")


def _check_with_optimizer(args: Any) -> None:
    """Check the MoFaSGD keys with the optimizer's own rules (mofasgd.options): each value, then all together."""
    option_of_key = {"learning_rate_mfsgd": "lr", **OPTION_OF_KEY}
    for key, option in {**option_of_key, "learning_rate_adamw": "lr"}.items():  # AdamW groups: the same lr rule
        value = getattr(args, key)
        if value is None:  # unset: the default learning rate, no warm-up, or stochastic rounding's automatic choice
            continue
        try:
            OPTION[option].check(value)
        except OptionError as error:
            raise ValueError(f"Invalid `{key}: {value!r}` in the MoFaSGD config: {error.expected}.") from None
    options = optimizer_options(args)
    if args.learning_rate_mfsgd is not None:
        options["lr"] = args.learning_rate_mfsgd
    try:
        validate(options)
    except OptionError as error:
        key_of = {option: key for key, option in option_of_key.items()}
        named = ", ".join(f"`{key_of[option]}`" for option in error.options if option in key_of)
        raise ValueError(f"Invalid MoFaSGD config: {error}" + (f" (the keys {named})." if named else ".")) from None


def _yaml_spelling(option: str, value: Any) -> str:
    """`` `mfsgd_init: weight` ``: an option as the YAML key that sets it (Python's spelling for the others)."""
    key = f"mfsgd_{option}"
    return f"`{key}: {yaml_text(value)}`" if key in OPTION_OF_KEY else f"`{option}={value!r}`"


def _check_engine_rules(args: Any, engine: str) -> None:
    """Refuse the `mfsgd_*` values `engine` does not run (mofasgd.options.ENGINE_RULES), in the YAML's words."""
    try:
        check_engine(optimizer_options(args), engine)
    except OptionError as error:
        value = getattr(args, f"mfsgd_{error.option}")
        note = "(also what `mfsgd_adamw_side: compact` sets)" if error.option == "adamw_state" else ""
        raise ValueError(error.rule.message(value, _yaml_spelling, note)) from None


def apply_adamw_side_preset(args: Any) -> None:
    """Set `mfsgd_adamw_state` / `mfsgd_fused_adamw_side` from `mfsgd_adamw_side`; refuse a contradicting key."""
    preset = getattr(args, "mfsgd_adamw_side", None)
    if preset is None:
        return
    wanted = ADAMW_SIDE_PRESETS[preset]
    current = (args.mfsgd_adamw_state, args.mfsgd_fused_adamw_side)
    defaults = (OPTIMIZER_DEFAULTS["adamw_state"], OPTIMIZER_DEFAULTS["fused_adamw_side"])
    if current not in (wanted, defaults):
        raise ValueError(
            f"`mfsgd_adamw_side: {preset}` means `mfsgd_adamw_state: {wanted[0]}` and `mfsgd_fused_adamw_side: "
            f"{str(wanted[1]).lower()}`, but the config also sets {current[0]} / {str(current[1]).lower()}. Use the "
            "preset or the two keys, not both."
        )
    args.mfsgd_adamw_state, args.mfsgd_fused_adamw_side = wanted


# LLaMA-Factory stages whose trainers build their optimizer through create_custom_optimizer inside the HF Trainer
# loop (each is trained end to end in tests/test_llamafactory_stages.py)
MFSGD_STAGES = ("pt", "sft", "rm", "dpo", "kto")


def _ppo_refusal() -> str:
    """Why `use_mfsgd` with `stage: ppo` is refused, and what to train instead."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        trl = f"trl {version('trl')} is installed"
    except PackageNotFoundError:
        trl = "trl is not installed"
    return (
        "`use_mfsgd: true` cannot train `stage: ppo`: LLaMA-Factory 0.9.5's PPO trainer is written for the old TRL "
        f"API (trl 0.8.6-0.9.6: `PPOTrainer.step`, `trl.core.logprobs_from_logits`), while LLaMA-Factory itself needs "
        f"trl >= 0.18 ({trl}), so its PPO stage does not run here with any optimizer; and its PPO loop steps and "
        "clips the optimizer outside the HF Trainer loop whose gradient-norm, clipping and resume MoFaSGD extends. "
        "Train the policy with `stage: dpo` or `stage: kto` on preference data instead (both take `use_mfsgd: true`, "
        "as does `stage: rm` for a reward model)."
    )


def validate_extension_values(args: Any) -> None:
    """Check the extension's own keys (called from FinetuningArguments.__post_init__)."""
    check_extension_types({key: getattr(args, key) for key in extension_fields() if hasattr(args, key)})
    fill_null_defaults(args)
    apply_adamw_side_preset(args)
    validate_baseline_values(args)
    if args.galore_fused and not args.use_galore:
        raise ValueError("`galore_fused: true` needs `use_galore: true`.")
    if args.galore_fused and args.galore_layerwise:
        raise ValueError("`galore_fused: true` replaces `galore_layerwise`; set `galore_layerwise: false`.")
    if args.profile_memory_stop_step < 1:
        raise _bad("profile_memory_stop_step", args.profile_memory_stop_step, "an integer >= 1")
    if args.profile_memory_stop_accumulation_step < 0:
        raise _bad(
            "profile_memory_stop_accumulation_step", args.profile_memory_stop_accumulation_step, "an integer >= 0"
        )
    if args.profile_memory_max_entries < 1:
        raise _bad("profile_memory_max_entries", args.profile_memory_max_entries, "an integer >= 1")
    if not args.use_mfsgd:
        return
    if args.finetuning_type != "full":
        raise ValueError(
            f"`use_mfsgd: true` trains every weight and cannot be combined with `finetuning_type: "
            f"{args.finetuning_type}`; set `finetuning_type: full` (or drop use_mfsgd to train LoRA/freeze)."
        )
    others = [k for k in ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon") if getattr(args, k)]
    if others:
        raise ValueError(f"`use_mfsgd: true` cannot be combined with {', '.join(f'`{k}: true`' for k in others)}.")
    if args.stage == "ppo":
        raise ValueError(_ppo_refusal())
    if args.stage not in MFSGD_STAGES:
        raise ValueError(
            f"`use_mfsgd: true` is not supported for `stage: {args.stage}` (use {', '.join(MFSGD_STAGES)})."
        )
    _check_with_optimizer(args)
    if not args.mfsgd_target.strip():
        raise _bad("mfsgd_target", args.mfsgd_target, "`all` or comma-separated module names")


def _fsdp_version(fsdp_config: Any) -> str:
    """The FSDP version a raw `fsdp_config` asks for ("1" unless it says 2), read like transformers does."""
    if isinstance(fsdp_config, str) and os.path.isfile(fsdp_config):
        with open(fsdp_config, encoding="utf-8") as handle:
            fsdp_config = json.load(handle)
    fsdp_config = fsdp_config if isinstance(fsdp_config, dict) else {}
    return str(fsdp_config.get("fsdp_version", fsdp_config.get("version", 1)))


_SCALE_OUT = (
    "MoFaSGD runs on FSDP2 (`fsdp: full_shard auto_wrap` with `fsdp_config: {fsdp_version: 2, "
    "transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}`: weights stay row-sharded matrices, U is sharded like "
    "them) or on plain DDP (`python run.py CFG --ngpus N` or `FORCE_TORCHRUN=1 llamafactory-cli train CFG`)"
)


def check_adamw_side_preset_keys(values: dict[str, Any]) -> None:
    """Refuse `mfsgd_adamw_side` written beside either key it sets, even one equal to its default.

    Parsed arguments cannot tell a key set to its default from an unset one, so only the raw config can refuse
    `mfsgd_adamw_side: compact` with `mfsgd_adamw_state: full`; `apply_adamw_side_preset` covers the rest.
    """
    if not is_set(values.get("use_mfsgd")):
        return
    both = [key for key in ("mfsgd_adamw_state", "mfsgd_fused_adamw_side") if key in values]
    if values.get("mfsgd_adamw_side") is not None and both:
        raise ValueError(
            f"`mfsgd_adamw_side: {values['mfsgd_adamw_side']}` is a preset of `mfsgd_adamw_state` and "
            f"`mfsgd_fused_adamw_side`; the config also sets {', '.join(f'`{k}`' for k in both)}. Use the preset or "
            "the two keys, not both."
        )


def _warn(message: str) -> None:
    """A parse-time warning through LLaMA-Factory's logger (imported here: run.py reads configs without it)."""
    from llamafactory.extras.logging import get_logger

    get_logger("llamafactory.mfsgd").warning_rank0(message)


def check_unused_keys(values: dict[str, Any]) -> None:
    """Keys a MoFaSGD run would ignore: `optim:` (warned) and β warm-up bounds without a warm-up (refused).

    Only the raw config tells a key written as its default from one left out, so these run before parsing.
    `mfsgd_beta_start`/`_end` without `mfsgd_beta_warmup_steps` are refused: they do nothing, and the missing key is
    the likely mistake. Written beside `mfsgd_beta_warmup_steps: 0` (the warm-up switched off on purpose) they get
    a warning.
    """
    if not is_set(values.get("use_mfsgd")):
        return
    if "optim" in values:
        _warn(
            f"`optim: {values['optim']}` is ignored (optim: {values['optim']} -> MoFaSGD): `use_mfsgd: true` trains "
            "with MoFaSGD, whose AdamW side (embeddings, LM head, norms) is torch's AdamW, set by "
            "`learning_rate_adamw`, `adam_beta1`/`adam_beta2`, `adam_epsilon` and `mfsgd_adamw_state`. Remove "
            "`optim:` from the config."
        )
    bounds = {key: values[key] for key in ("mfsgd_beta_start", "mfsgd_beta_end") if values.get(key) is not None}
    if not bounds:
        return
    written = ", ".join(f"`{key}: {value}`" for key, value in bounds.items())
    if "mfsgd_beta_warmup_steps" not in values:
        raise ValueError(
            f"{written} set a linear beta warm-up, but the config has no `mfsgd_beta_warmup_steps`, so beta would "
            "stay `mfsgd_beta` throughout. Add `mfsgd_beta_warmup_steps: N` (the warm-up's length in optimizer "
            "steps), or remove the warm-up keys."
        )
    if values["mfsgd_beta_warmup_steps"] == 0:
        start = values.get("mfsgd_beta_start", OPTIMIZER_DEFAULTS["beta_start"])
        end = values.get("mfsgd_beta_end", OPTIMIZER_DEFAULTS["beta_end"])
        beta = values.get("mfsgd_beta", OPTIMIZER_DEFAULTS["beta"])
        _warn(
            f"`mfsgd_beta_warmup_steps: 0` switches the beta warm-up off: {written} are unused (warm-up {start} -> "
            f"{end} not applied), and beta stays `mfsgd_beta` = {beta} throughout."
        )


def validate_engine_keys(values: dict[str, Any]) -> None:
    """Refuse engines MoFaSGD cannot factor under, before the training arguments are built (DeepSpeed inits there)."""
    if not is_set(values.get("use_mfsgd")):
        return
    if is_set(values.get("deepspeed")):
        raise ValueError(
            "`use_mfsgd: true` does not run under DeepSpeed: ZeRO hands the optimizer flattened 1-D shards, so no "
            f"weight matrix is left to factor. Remove `deepspeed:`; {_SCALE_OUT}."
        )
    if is_set(values.get("fsdp")) or is_set(values.get("fsdp_config")):
        version = _fsdp_version(values.get("fsdp_config"))
        if version != "2":
            raise ValueError(
                f"`use_mfsgd: true` does not run under FSDP{version} (`fsdp_version: {version}`): FSDP1 hands the "
                "optimizer flattened 1-D shards, so no weight matrix is left to factor. Set `fsdp_version: 2` in "
                f"`fsdp_config`, or remove `fsdp:`; {_SCALE_OUT}."
            )


def validate_with_training_args(finetuning_args: Any, training_args: Any) -> None:
    """Cross-checks against the HF training arguments, at parse time, one clear error each."""
    if finetuning_args.galore_fused:
        if training_args.world_size > 1:
            raise ValueError("`galore_fused: true` runs in a single process; drop it for multi-GPU GaLore runs.")
        if training_args.optim != "adamw_torch":
            raise ValueError(
                f"`galore_fused: true` fuses GaLore-AdamW only; set `optim: adamw_torch` (got {training_args.optim})."
            )
        if training_args.fp16:
            raise ValueError(
                "`fp16: true` scales the loss, and `galore_fused: true` updates each weight in its gradient hook, "
                "before the scaler can unscale the gradient. Use `bf16: true` / `pure_bf16: true`, or drop "
                "`galore_fused`."
            )
    if not finetuning_args.use_mfsgd:
        return
    if training_args.fp16 and finetuning_args.mfsgd_fused:
        raise ValueError(
            "`fp16: true` scales the loss, and fused MoFaSGD consumes gradients before the scaler can unscale "
            "them. Use `bf16: true` / `pure_bf16: true`, or set `mfsgd_fused: false`."
        )
    if training_args.fsdp:  # FSDP1 was refused with the engine keys: this is FSDP2
        _check_engine_rules(finetuning_args, "fsdp2")
    if training_args.fsdp and not _fsdp_applies():
        raise ValueError(
            "`fsdp:` is set, but accelerate applies FSDP on GPUs only: these CPU processes would silently train "
            "with DDP instead. Remove `fsdp:`/`fsdp_config:` for CPU runs (MoFaSGD then averages its projections over "
            "DDP), or set MFSGD_CPU_FSDP2=1 to run FSDP2 on CPU processes (gloo) for testing."
        )
    frozen = _why_every_matrix_is_frozen(finetuning_args, training_args.max_grad_norm)
    if frozen:
        reason, fix = frozen
        raise ValueError(
            f"{reason}, so every MoFaSGD matrix would stay frozen (only weight decay would touch it) while the run "
            f"looks normal. {fix}. To train only the other parameters on purpose, use `finetuning_type: freeze`."
        )
    if finetuning_args.mfsgd_stochastic_rounding and not finetuning_args.pure_bf16:
        _warn(
            "`mfsgd_stochastic_rounding: true` has no effect here (true -> no rounding): without `pure_bf16: true` "
            "LLaMA-Factory trains fp32 weights, and MoFaSGD adds their updates in fp32 without rounding. Set "
            "`pure_bf16: true` to train bf16 weights (then rounding is on by default), or remove the key."
        )
    if finetuning_args.mfsgd_rounding_kernel != "auto" and (
        not finetuning_args.pure_bf16 or finetuning_args.mfsgd_stochastic_rounding is False
    ):
        _warn(
            f"`mfsgd_rounding_kernel: {finetuning_args.mfsgd_rounding_kernel}` has no effect here: it chooses how "
            "bf16 weights' stochastically rounded updates run, and this run rounds nothing (it needs `pure_bf16: "
            "true` with `mfsgd_stochastic_rounding` unset or true). Remove the key, or train bf16 weights."
        )
    check_checkpoint_engine(training_args.resume_from_checkpoint, bool(training_args.fsdp))


def _why_every_matrix_is_frozen(args: Any, max_grad_norm: float) -> tuple[str, str] | None:
    """Why the MoFaSGD step of every matrix is zero with these settings (the first key at fault) and the fix, or None.

    With `mfsgd_eta2: 0` a matrix moves only along eta1 U diag(s_hat) V^T. Refused rather than warned: such a run
    trains the AdamW side alone while its log looks like a MoFaSGD run, and no setting needs it (`finetuning_type:
    freeze` freezes matrices on purpose). The eps bound: clipping keeps each step's tangent gradient below
    `max_grad_norm` (Frobenius, so spectral too), and M <- SVD_r(beta M + G_hat) then keeps S_1 below
    beta^t S_1(0) + max_grad_norm / (1 - beta); once the initial weight's share has decayed no S exceeds eps.
    """
    if args.mfsgd_eta2 > 0:  # the complement step moves the matrices whatever the low-rank step does
        return None
    if args.mfsgd_eta1 == 0:
        return (
            f"`mfsgd_eta1: {args.mfsgd_eta1}` (with `mfsgd_eta2: {args.mfsgd_eta2}`) scales every MoFaSGD step to "
            "zero",
            f"Set `mfsgd_eta1: {OPTIMIZER_DEFAULTS['eta1']}` (the default)",
        )
    if args.mfsgd_max_value == 0 and not args.mfsgd_use_ones_for_nonzero_s:
        return (
            f"`mfsgd_max_value: {args.mfsgd_max_value}` makes every step scale min(1/S, max_value) zero (the "
            "reciprocal-S step, `mfsgd_use_ones_for_nonzero_s: false`)",
            f"Set `mfsgd_max_value: {OPTIMIZER_DEFAULTS['max_value']:g}` (the default) or "
            "`mfsgd_use_ones_for_nonzero_s: true`",
        )
    warmup = args.mfsgd_beta_warmup_steps > 0
    beta = max(args.mfsgd_beta_start, args.mfsgd_beta_end) if warmup else args.mfsgd_beta
    ceiling = max_grad_norm / (1 - beta) if max_grad_norm and max_grad_norm > 0 else math.inf
    if args.mfsgd_eps >= ceiling:
        bound = (
            f"with `max_grad_norm: {max_grad_norm}` and beta <= {beta:g} the momentum's singular values stay below "
            f"max_grad_norm / (1 - beta) = {ceiling:g} once the initial weight's share has decayed (by beta per step)"
            if math.isfinite(ceiling)
            else "eps is infinite"
        )
        return (
            f"`mfsgd_eps: {args.mfsgd_eps}` drops every direction of the momentum: singular values <= eps take no "
            f"step, and {bound}",
            f"Use a small eps such as `mfsgd_eps: {OPTIMIZER_DEFAULTS['eps']:g}` (the default)",
        )
    return None


# what accelerate writes for a sharded (DCP) FSDP checkpoint of the model
_FSDP_SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"


def check_checkpoint_engine(checkpoint: str | None, fsdp: bool) -> None:
    """Refuse resuming across engines: sharded FSDP2 checkpoints resume under FSDP2, the others without FSDP.

    accelerate saves FSDP2 runs as DCP shards (``pytorch_model_fsdp_0/``, ``optimizer_0/``); the plain Trainer
    finds no weights file there, and FSDP2 finds no shards in a DDP or single-process checkpoint.
    """
    if not checkpoint or not os.path.isdir(checkpoint):
        return
    names = os.listdir(checkpoint)
    sharded = _FSDP_SHARDED_MODEL_DIR in names and not {"model.safetensors", "pytorch_model.bin"} & set(names)
    saved_by_fsdp = any(name.startswith("pytorch_model_fsdp") for name in names)
    if sharded and not fsdp:
        raise ValueError(
            f"`resume_from_checkpoint: {checkpoint}` was saved under FSDP2 as sharded DCP files "
            f"({_FSDP_SHARDED_MODEL_DIR}/, optimizer_0/): resume it with the same `fsdp:`/`fsdp_config:` keys "
            "(any number of GPUs: DCP reshards). To continue without FSDP, merge the weights with `accelerate "
            f"merge-weights {checkpoint}/{_FSDP_SHARDED_MODEL_DIR} MERGED_DIR` and start a new run from them "
            "(`model_name_or_path`), with a fresh optimizer state."
        )
    if fsdp and not saved_by_fsdp:
        raise ValueError(
            f"`resume_from_checkpoint: {checkpoint}` was saved without FSDP (no {_FSDP_SHARDED_MODEL_DIR}/), but "
            "this run uses FSDP2. Resume it without `fsdp:`, or start the FSDP2 run from its weights "
            f"(`model_name_or_path: {checkpoint}`) with a fresh optimizer state."
        )


def _fsdp_applies() -> bool:
    """Whether accelerate will shard with FSDP here: on CUDA, or on CPU processes with MFSGD_CPU_FSDP2=1."""
    import torch

    return torch.cuda.is_available() or env_flag("MFSGD_CPU_FSDP2", default=False)
