"""What the extension changes in LLaMA-Factory, one function per extended module (applied by `activation`).

- ``hparams.parser``: FinetuningArguments gains our keys; parsing checks their spelling and cross-field rules;
  ``MFSGD_CPU_PURE_BF16=1`` lets ``pure_bf16`` run on a CPU (bf16 weights without a GPU, for tests/benchmarks);
  ``MFSGD_CPU_FSDP2=1`` lets accelerate apply FSDP2 to CPU processes (gloo), which it otherwise runs as DDP.
- ``data.template``: registers the Tulu 3 chat format as ``tulu_v3`` when LLaMA-Factory has none.
- ``train.trainer_utils``: ``create_custom_optimizer`` builds MoFaSGD / fused GaLore and applies the baselines'
  keys; ``create_custom_scheduler`` takes the authors' scheduler kwargs.
- ``train.tuner``: ``run_exp`` hands our callbacks (memory snapshot, diagnostics requests) to the trainer.

What changes in transformers' ``Trainer`` is in :mod:`llamafactory_mfsgd.hf_trainer`, and the workarounds for
upstream bugs are in :mod:`llamafactory_mfsgd.compat`; :data:`llamafactory_mfsgd.activation.TARGETS` lists
which of them each LLaMA-Factory module triggers.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import time
from types import ModuleType
from typing import Any

from .activation import env_flag
from .arguments import (
    EXTENSION_DATACLASSES,
    ProfileMemoryArguments,
    check_adamw_side_preset_keys,
    check_extension_types,
    check_key_spelling,
    check_unused_keys,
    extension_field_names,
    fill_null_defaults,
    validate_engine_keys,
    validate_extension_values,
    validate_with_training_args,
)
from .baselines import apply_baseline_keys
from .compat import check_llamafactory_version, require
from .cuda_cache import release_cache_after_gradient_hooks
from .diagnostics import MfsgdDiagnosticsCallback
from .schedulers import check_scheduler_kwargs, wrap_create_custom_scheduler
from .tulu3_mixture import prepare_for_training

CPU_PURE_BF16_ENV = "MFSGD_CPU_PURE_BF16"
CPU_FSDP2_ENV = "MFSGD_CPU_FSDP2"
GLOO_DRAIN_SECONDS = 0.5


def _raw_values(raw: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Top-level keys and values of a parsed YAML/JSON config, or of a `--key value` / `--key=value` command line."""
    if isinstance(raw, dict):
        return raw
    values: dict[str, Any] = {}
    for i, token in enumerate(raw):
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            has_next = i + 1 < len(raw) and not raw[i + 1].startswith("--")
            values[key] = value if sep else (raw[i + 1] if has_next else True)
    return values


def _extend_finetuning_arguments(base: type) -> type:
    """A dataclass subclass of LLaMA-Factory's FinetuningArguments with the extension's fields and checks."""

    def __post_init__(self) -> None:
        base.__post_init__(self)
        validate_extension_values(self)

    namespace = {"__post_init__": __post_init__, "__doc__": base.__doc__, "__module__": __name__}
    cls = type("FinetuningArguments", (base, *EXTENSION_DATACLASSES), namespace)
    return dataclasses.dataclass(cls)


def patch_parser(module: ModuleType) -> None:
    """Swap in the extended FinetuningArguments and wrap get_train_args with our parse-time checks."""
    check_llamafactory_version()
    require(module, "FinetuningArguments", "_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS", "get_train_args", "read_args")
    base = module.FinetuningArguments
    extended = _extend_finetuning_arguments(base)
    for name in ("_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS", "_TRAIN_MCA_ARGS"):
        classes = getattr(module, name, None)
        if classes:
            classes[:] = [extended if cls is base else cls for cls in classes]
    module.FinetuningArguments = extended
    allow_cpu_pure_bf16(module)
    allow_cpu_fsdp2()
    original = module.get_train_args
    known = {f.name for cls in module._TRAIN_ARGS for f in dataclasses.fields(cls)}

    def get_train_args(args=None):
        raw = module.read_args(args)
        values = _raw_values(raw)
        check_key_spelling(list(values), known)
        values = check_extension_types(values, command_line=isinstance(raw, list))  # before the parser coerces
        check_adamw_side_preset_keys(values)
        check_unused_keys(values)
        validate_engine_keys(values)
        parsed = original(raw)
        model_args, data_args, training_args, finetuning_args, generating_args = parsed
        validate_with_training_args(finetuning_args, training_args)
        check_scheduler_kwargs(training_args, _fill_scheduler_defaults)
        prepare_for_training(data_args, training_args)
        return parsed

    get_train_args.__doc__ = original.__doc__
    module.get_train_args = get_train_args


def _fill_scheduler_defaults(training_args: Any, num_training_steps: int) -> None:
    """LLaMA-Factory's scheduler-kwargs defaults (WSD stable/decay split), as training will apply them."""
    from llamafactory.train.trainer_utils import create_custom_scheduler

    create_custom_scheduler(training_args, num_training_steps)


def guard_parser(module: ModuleType) -> None:
    """With the extension switched off, refuse configs that use its keys (even under ALLOW_EXTRA_ARGS)."""
    require(module, "get_train_args", "read_args")
    original = module.get_train_args
    ours = extension_field_names()

    def get_train_args(args=None):
        raw = module.read_args(args)
        used = sorted(set(_raw_values(raw)) & ours)
        if used:
            raise ValueError(
                f"This config uses {used}, but the MoFaSGD extension is switched off (LLAMAFACTORY_MFSGD="
                f"{os.environ.get('LLAMAFACTORY_MFSGD')}). Unset LLAMAFACTORY_MFSGD to train with MoFaSGD."
            )
        return original(raw)

    module.get_train_args = get_train_args


def _memory_session(values: dict[str, Any]) -> Any:
    """A started MemorySnapshotSession when the config sets `profile_memory_from_start: true`, else None.

    Started here, before LLaMA-Factory loads the model, so that parameter allocation is recorded.
    """
    values = check_extension_types(values)
    keys = {f.name for f in dataclasses.fields(ProfileMemoryArguments)}
    profile = fill_null_defaults(ProfileMemoryArguments(**{k: v for k, v in values.items() if k in keys}))
    if not profile.profile_memory_from_start:
        return None
    from .memory_snapshot import MemorySnapshotSession

    session = MemorySnapshotSession(
        output_dir=values.get("output_dir", "."),
        stop_step=profile.profile_memory_stop_step,
        stop_accumulation_step=profile.profile_memory_stop_accumulation_step,
        max_entries=profile.profile_memory_max_entries,
    )
    session.start()
    return session


def _let_gloo_workers_finish() -> None:
    """Give gloo's worker threads time to free FSDP2's finished collectives before the interpreter shuts down.

    A gloo worker thread drops its reference to a finished all-gather a little after the caller's wait returns;
    when that reference is the last one, freeing the Python-owned output tensors takes the GIL. If interpreter
    finalization has begun by then, Python ends the thread inside that destructor and the process aborts
    ("terminate called without an active exception"; about 1 run in 10 here, torch 2.14). Sleeping in an atexit
    handler releases the GIL while the interpreter is still whole.
    """
    time.sleep(GLOO_DRAIN_SECONDS)


def drain_gloo_at_exit() -> bool:
    """In a multi-process gloo run (CPU DDP, DeepSpeed or FSDP2 on gloo), run the gloo drain once at exit.

    The same abort hits DeepSpeed ZeRO-3's all-gathers on CPU processes (seen in CI, torch 2.14). Returns whether
    the wait was registered.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    if dist.get_backend() != "gloo":
        return False
    atexit.unregister(_let_gloo_workers_finish)  # once however often it is asked for
    atexit.register(_let_gloo_workers_finish)
    return True


def _gloo_drain_callback() -> Any:
    """A Trainer callback that registers the gloo drain when training starts (the process group exists by then)."""
    from transformers import TrainerCallback

    class GlooExitDrain(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            drain_gloo_at_exit()

    return GlooExitDrain()


def patch_tuner(module: ModuleType) -> None:
    """Hand our callbacks (the memory snapshot session) to the trainer that run_exp builds."""
    require(module, "run_exp", "read_args")
    original = module.run_exp

    def run_exp(args=None, callbacks=None):
        raw = module.read_args(args)
        callbacks = list(callbacks or [])
        session = _memory_session(check_extension_types(_raw_values(raw), command_line=isinstance(raw, list)))
        if session is not None:
            callbacks.append(session)
        callbacks.append(MfsgdDiagnosticsCallback())
        callbacks.append(_gloo_drain_callback())
        return original(raw, callbacks)

    run_exp.__doc__ = original.__doc__
    module.run_exp = run_exp


def patch_template(module: ModuleType) -> None:
    """Register the Tulu 3 chat format as `tulu_v3` (the authors' configs use it; 0.9.5 lacks it)."""
    require(module, "TEMPLATES", "register_template")
    if "tulu_v3" in module.TEMPLATES:
        return
    from llamafactory.data.formatter import EmptyFormatter, StringFormatter

    # `<|assistant|>\n` sits in the user slot, so LLaMA-Factory masks it with the prompt and trains on the reply,
    # its EOS and the newline only. That is the Tulu 3 recipe's choice: open-instruct's SFT masking
    # (open_instruct/dataset_transformation.py, sft_tulu_tokenize_and_truncate_v1) ends each masked span with
    # add_generation_prompt=True "to avoid the assistant generation prefix being included in the loss". The
    # authors' fork puts the prefix in the assistant slot and so trains on it.
    module.register_template(
        name="tulu_v3",
        format_user=StringFormatter(slots=["<|user|>\n{{content}}\n<|assistant|>\n"]),
        format_assistant=StringFormatter(slots=["{{content}}", {"eos_token"}, "\n"]),
        format_system=StringFormatter(slots=["<|system|>\n{{content}}\n"]),
        format_prefix=EmptyFormatter(slots=[{"bos_token"}]),
    )


def patch_trainer_utils(module: ModuleType) -> None:
    """Route `use_mfsgd` / `galore_fused` to our optimizers; scheduler kwargs of the authors' configs."""
    require(module, "create_custom_optimizer", "create_custom_scheduler")
    original = module.create_custom_optimizer

    def create_custom_optimizer(model, training_args, finetuning_args):
        if getattr(finetuning_args, "use_mfsgd", False):
            from .optimizer_factory import create_mfsgd_optimizer

            return release_cache_after_gradient_hooks(create_mfsgd_optimizer(model, training_args, finetuning_args))
        if getattr(finetuning_args, "galore_fused", False):
            from .galore_factory import create_fused_galore_optimizer

            return apply_baseline_keys(
                create_fused_galore_optimizer(model, training_args, finetuning_args), finetuning_args
            )
        return apply_baseline_keys(original(model, training_args, finetuning_args), finetuning_args)

    create_custom_optimizer.__doc__ = original.__doc__
    module.create_custom_optimizer = create_custom_optimizer
    module.create_custom_scheduler = wrap_create_custom_scheduler(module.create_custom_scheduler)


def allow_cpu_pure_bf16(module: ModuleType) -> None:
    """With MFSGD_CPU_PURE_BF16=1 and no CUDA, let `pure_bf16` pass LLaMA-Factory's device check.

    The model is then loaded and trained in bf16 on the CPU (no AMP, no fp32 master weights): the same
    weight path as pure_bf16 on a GPU, slower. For tests and benchmarks of bf16 updates without a GPU.
    """
    import torch

    if env_flag(CPU_PURE_BF16_ENV, default=False) and not torch.cuda.is_available():
        require(module, "is_torch_bf16_gpu_available")
        module.is_torch_bf16_gpu_available = lambda: True


def allow_cpu_fsdp2() -> None:
    """With MFSGD_CPU_FSDP2=1 and no CUDA, let accelerate really apply FSDP on CPU processes (gloo).

    accelerate enables FSDP for multi-GPU runs only: on CPU processes it keeps an `fsdp:` config's plugin aside
    and trains with DDP. FSDP2 itself runs on CPU with gloo, so this switch lets tests and CPU benchmarks go
    through the real Trainer/accelerate FSDP2 path (fully_shard, sharded checkpoints) without a GPU.
    """
    import torch

    if not env_flag(CPU_FSDP2_ENV, default=False) or torch.cuda.is_available():
        return
    import accelerate.state as state

    require(state, "AcceleratorState", "DistributedType", "PartialState")
    original = state.AcceleratorState.__init__
    if getattr(original, "__mfsgd_cpu_fsdp2__", False):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type = state.DistributedType.FSDP
            # as accelerate records its own choice: every later AcceleratorState() copies PartialState's type over
            # the shared state, which would turn the run back into MULTI_CPU (then get_state_dict does not gather)
            state.PartialState._shared_state["distributed_type"] = self.distributed_type
            self.fsdp_plugin = plugin
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            atexit.unregister(_let_gloo_workers_finish)  # registered once however many states are built
            atexit.register(_let_gloo_workers_finish)

    __init__.__mfsgd_cpu_fsdp2__ = True
    state.AcceleratorState.__init__ = __init__
