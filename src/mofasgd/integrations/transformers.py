"""MoFaSGD in a plain ``transformers.Trainer`` or any subclass (Seq2SeqTrainer, TRL's SFTTrainer, ...).

::

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=data)
    enable_mofasgd(trainer, rank=8, lr=1e-3, adamw_lr=3e-4)
    trainer.train()

Everything changes on this trainer instance only, nothing process-wide:

- the optimizer: ``trainer.optimizer_cls_and_kwargs`` becomes a factory, transformers' own seam for optimizers that
  need the model (its docstring names Muon and Dion). ``create_optimizer`` calls it before accelerate prepares the
  model, so DDP (the managed matrices left out of its all-reduce, their projections averaged by the optimizer) and
  FSDP2 (accelerate swaps the sharded parameters in) work as in LLaMA-Factory, and checkpoints are the Trainer's own
  (``optimizer.pt``; under FSDP2 the sharded ``optimizer_0/``: U, S, V of every matrix);
- clipping and the logged ``grad_norm``: the Trainer calls ``accelerator.clip_grad_norm_(model.parameters(), ...)``,
  blind to the gradients MoFaSGD consumed in backward; this trainer's accelerator answers through the optimizer
  (``MoFaSGD.clip_grad_norm_`` / ``grad_norm``, which cover every parameter);
- resuming: after the Trainer loads the optimizer and the scheduler, the scheduler follows this run's base learning
  rates; under FSDP2, MoFaSGD's sharded state (``optimizer_0/``, which accelerate would read into nothing) is loaded
  by parameter name (:mod:`mofasgd.resume`, as LLaMA-Factory's path does).

Routing is LLaMA-Factory's (:func:`mofasgd.split_for_mofasgd`): hidden matrices to MoFaSGD at `lr`, embeddings, LM
head, norms and biases to AdamW at `adamw_lr`, weight decay by the Trainer's own rule. Refused, with the reason:
DeepSpeed and FSDP1 (they hand the optimizer flattened shards), ``fsdp`` that accelerate does not apply (CPU: it
would run DDP), fp16 with fused MoFaSGD, ``optimizers=`` / ``optimizer_cls_and_kwargs`` given to the trainer.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import types
from typing import Any

import torch
import transformers

from mofasgd import DEFAULTS, MoFaSGD, validate
from mofasgd.build import build_for_model, hook_path_reason, rank_above_size_message
from mofasgd.resume import load_fsdp2_sharded_state, scheduler_follows_running_lrs

logger = logging.getLogger("mofasgd")

# Options the Trainer's arguments already hold: one source for each value, so they are refused as options.
FROM_TRAINING_ARGUMENTS = {
    "weight_decay": "weight_decay",
    "adam_betas": "adam_beta1 / adam_beta2",
    "adam_eps": "adam_epsilon",
    "seed": "seed",
}
# Options this integration decides from the trainer's engine.
DECIDED_HERE = {"data_parallel": "on under DDP (the optimizer averages its projections), off alone and under FSDP2"}
_OPTIONS = sorted(set(DEFAULTS) - {"lr"} - set(FROM_TRAINING_ARGUMENTS) - set(DECIDED_HERE))


def enable_mofasgd(
    trainer: transformers.Trainer,
    lr: float | None = None,
    adamw_lr: float | None = None,
    target: str | list[str] = "all",
    **options: Any,
) -> transformers.Trainer:
    """Make `trainer` (not yet trained) build MoFaSGD as its optimizer; returns the trainer.

    Args:
        trainer: a ``transformers.Trainer`` instance (any subclass) created without ``optimizers=`` and
            ``optimizer_cls_and_kwargs``.
        lr: learning rate of the MoFaSGD matrices (default: ``trainer.args.learning_rate``).
        adamw_lr: learning rate of the AdamW side: embeddings, LM head, norms, biases (default: the same).
        target: modules routed to MoFaSGD, as :func:`mofasgd.split_for_mofasgd` reads it (``"all"``,
            ``"q_proj,v_proj"``, ``"all,embed_tokens,lm_head"``).
        **options: MoFaSGD's own options with their defaults in ``mofasgd.DEFAULTS`` (``rank``, ``beta``, ``eta1``,
            ``init``, ``fused``, ...). ``weight_decay``, the Adam betas and epsilon and the seed come from
            ``trainer.args``.

    Raises:
        TypeError: `trainer` is not a transformers Trainer.
        ValueError: an unknown or misplaced option, a value MoFaSGD refuses, or an engine it cannot run under.
    """
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"enable_mofasgd needs a transformers.Trainer (or a subclass); got {type(trainer).__name__}")
    _check_option_names(options)
    if trainer.optimizer is not None or trainer.lr_scheduler is not None:
        raise ValueError(
            f"This {type(trainer).__name__} was given `optimizers=(optimizer, scheduler)`: enable_mofasgd builds the "
            "optimizer itself, and the scheduler from the Trainer's arguments. Create it without `optimizers=`."
        )
    if trainer.optimizer_cls_and_kwargs is not None:
        raise ValueError(
            f"This {type(trainer).__name__} was given `optimizer_cls_and_kwargs` "
            f"({trainer.optimizer_cls_and_kwargs[0]}): enable_mofasgd sets it to MoFaSGD's factory. Create the "
            "trainer without it."
        )
    settings = {
        "lr": trainer.args.learning_rate if lr is None else lr,
        "adamw_lr": trainer.args.learning_rate if adamw_lr is None else adamw_lr,
        "target": target,
        "options": options,
    }
    _check_values(settings)
    _check_engine(trainer, options)
    factory = _Factory(trainer, settings)
    trainer.optimizer_cls_and_kwargs = (lambda: factory, {})  # the Trainer calls cls()(model): a factory
    _load_with_running_lrs(trainer)
    trainer.add_callback(_RequireMoFaSGD(factory))
    return trainer


def _check_option_names(options: dict[str, Any]) -> None:
    """Refuse options MoFaSGD does not have, and those the Trainer's arguments or its engine decide."""
    for name in options:
        if name in FROM_TRAINING_ARGUMENTS:
            raise ValueError(
                f"`{name}` is not an option of enable_mofasgd: it comes from the Trainer's arguments "
                f"(`TrainingArguments.{FROM_TRAINING_ARGUMENTS[name]}`), set it there."
            )
        if name in DECIDED_HERE:
            raise ValueError(f"`{name}` is not an option of enable_mofasgd: it is decided here, {DECIDED_HERE[name]}.")
        if name not in _OPTIONS:
            close = difflib.get_close_matches(name, _OPTIONS, n=1, cutoff=0.5)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(f"Unknown MoFaSGD option `{name}`.{hint} Valid options: {', '.join(_OPTIONS)}.")


def _check_values(settings: dict[str, Any]) -> None:
    """MoFaSGD's own checks of every value, before training starts (mofasgd.options)."""
    validate({"lr": settings["lr"], **settings["options"]})
    validate({"lr": settings["adamw_lr"]})


def _fsdp_version(trainer: transformers.Trainer) -> int | None:
    """The FSDP version accelerate applies to this trainer, or None without FSDP."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return None if plugin is None else int(getattr(plugin, "fsdp_version", 1))


def _check_engine(trainer: transformers.Trainer, options: dict[str, Any]) -> None:
    """Refuse the engines and settings MoFaSGD cannot train under, naming the fix."""
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False) or args.deepspeed:
        raise ValueError(
            "MoFaSGD does not run under DeepSpeed: ZeRO hands the optimizer flattened 1-D shards, so no weight matrix "
            "is left to factor. Remove `deepspeed` from the TrainingArguments; use DDP (plain multi-process) or FSDP2 "
            "(`fsdp='full_shard auto_wrap'`, `fsdp_config={'fsdp_version': 2, ...}`)."
        )
    version = _fsdp_version(trainer)
    if version is not None and version != 2:
        raise ValueError(
            f"MoFaSGD does not run under FSDP{version}: FSDP1 hands the optimizer flattened 1-D shards, so no weight "
            "matrix is left to factor. Set `fsdp_config={'fsdp_version': 2, ...}` in the TrainingArguments, or drop "
            "`fsdp` (DDP)."
        )
    if args.fsdp and version is None:
        raise ValueError(
            "`fsdp` is set in the TrainingArguments, but accelerate does not apply FSDP here (it does on GPUs only): "
            "these processes would train with DDP while MoFaSGD expects FSDP2's sharded parameters. Drop `fsdp` for "
            "CPU runs (MoFaSGD then averages its projections over DDP)."
        )
    fused = options.get("fused", DEFAULTS["fused"])
    if args.fp16 and fused:
        raise ValueError(
            "`fp16=True` scales the loss, and fused MoFaSGD consumes gradients before the scaler can unscale them. "
            "Use `bf16=True`, or pass `fused=False` to enable_mofasgd."
        )
    if version == 2:  # the optimizer would refuse these at its first sharded matrix; say so before training
        validate(options, engine="fsdp2")


class _Factory:
    """What ``Trainer.create_optimizer`` calls with the model: builds MoFaSGD, routes the trainer's clipping to it."""

    def __init__(self, trainer: transformers.Trainer, settings: dict[str, Any]) -> None:
        self.trainer = trainer
        self.settings = settings
        self.built: MoFaSGD | None = None  # the last optimizer built

    def __call__(self, model: torch.nn.Module, **unused: Any) -> MoFaSGD:
        trainer, settings, options = self.trainer, self.settings, self.settings["options"]
        args = trainer.args
        _check_engine(trainer, options)  # the accelerator may have been rebuilt since (hyper-parameter search)
        fsdp2 = _fsdp_version(trainer) == 2
        fused = options.get("fused", DEFAULTS["fused"])
        gradient_state = trainer.accelerator.gradient_state  # the Trainer marks each window's last micro-batch here
        built = build_for_model(
            model,
            lr=settings["lr"],
            adamw_lr=settings["adamw_lr"],
            weight_decay=args.weight_decay,
            decay_names=trainer.get_decay_parameter_names(model),
            target=settings["target"],
            data_parallel=wrapped_in_ddp(args) and fused and not fsdp2,
            sharded=fsdp2,
            accumulation_boundary=lambda: gradient_state.sync_gradients,
            hook_path_reason=hook_path_reason(fsdp2, bool(args.torch_compile)),
            **options,
            adam_betas=(args.adam_beta1, args.adam_beta2),
            adam_eps=args.adam_epsilon,
            seed=args.seed,
        )
        warning = rank_above_size_message(built.routing.mofasgd, built.optimizer.param_groups[0]["rank"])
        if warning and args.process_index == 0:
            logger.warning(warning)
        if args.process_index == 0:
            logger.info(built.report(settings["target"]))
        _clip_through_optimizer(trainer.accelerator, built.optimizer)
        self.built = built.optimizer
        return built.optimizer


class _RequireMoFaSGD(transformers.TrainerCallback):
    """Fails the run at its start when the trainer's optimizer is not the MoFaSGD built by enable_mofasgd.

    A subclass whose ``create_optimizer`` ignores ``optimizer_cls_and_kwargs`` would otherwise train with AdamW
    while the script asked for MoFaSGD.
    """

    def __init__(self, factory: _Factory) -> None:
        self.factory = factory

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Check the optimizer the Trainer is about to train with."""
        built = getattr(self.factory, "built", None)
        if built is None or _unwrapped(optimizer) is not built:
            trainer = type(self.factory.trainer).__name__
            raise RuntimeError(
                f"enable_mofasgd was called, but {trainer} trains with {type(_unwrapped(optimizer)).__name__}: its "
                "`create_optimizer` did not use `optimizer_cls_and_kwargs`. Let it call `Trainer.create_optimizer` "
                "when `self.optimizer_cls_and_kwargs` is set."
            )


def wrapped_in_ddp(args: transformers.TrainingArguments) -> bool:
    """Whether accelerate will wrap the model in DDP: any torch.distributed run, one process under torchrun included.

    DDP's reducer expects a gradient for every parameter it was not told to ignore, so the managed matrices (which
    the projected backward never gives one) are left out of it even then; averaging over one rank costs nothing.
    """
    return args.parallel_mode == transformers.training_args.ParallelMode.DISTRIBUTED


def _clip_through_optimizer(accelerator: Any, optimizer: MoFaSGD) -> None:
    """Let this accelerator's ``clip_grad_norm_`` answer through MoFaSGD when asked about the optimizer's parameters.

    Replaces the method on this accelerator instance (as LLaMA-Factory's BAdam does). Given a set of parameters that
    holds every parameter of the optimizer (the Trainer passes ``model.parameters()``), the norm is the optimizer's:
    exact over every parameter, the managed matrices' consumed gradients included, and clipping scales what the
    step consumes. Other parameter sets go to accelerate's own method.
    """
    original = getattr(accelerator.clip_grad_norm_, "__mofasgd_original__", accelerator.clip_grad_norm_)

    def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2) -> torch.Tensor:
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        given = {id(p) for p in parameters}
        # read now: under FSDP2 accelerate swaps the sharded parameters into the groups after the optimizer is built
        if not all(id(p) in given for group in optimizer.param_groups for p in group["params"]):
            return original(parameters, max_norm, norm_type)
        if norm_type != 2:
            raise ValueError(f"MoFaSGD clips by the L2 norm; clip_grad_norm_ was asked for norm_type={norm_type}")
        accelerator.unscale_gradients()  # fp16 (fused=False): divide by the loss scale first, as accelerate does
        if math.isinf(max_norm):  # the Trainer's norm-only call (max_grad_norm = 0)
            return optimizer.grad_norm()
        return optimizer.clip_grad_norm_(max_norm)

    clip_grad_norm_.__mofasgd_original__ = original
    accelerator.clip_grad_norm_ = clip_grad_norm_


def _load_with_running_lrs(trainer: transformers.Trainer) -> None:
    """On resume, after the Trainer's own load of optimizer.pt and scheduler.pt, the scheduler follows our lrs.

    Under FSDP2, MoFaSGD's sharded state is then loaded by parameter name (the Trainer's own load reads nothing).
    """
    load = type(trainer)._load_optimizer_and_scheduler  # the class's (a subclass may extend it); bound below

    def _load_optimizer_and_scheduler(self: transformers.Trainer, checkpoint: str | None) -> None:
        sharded = _fsdp2_sharded_optimizer(self, checkpoint)
        load(self, checkpoint)  # under FSDP2: the scheduler; its optimizer load finds no state to fill
        if sharded is not None:
            load_fsdp2_sharded_state(self.model, _unwrapped(self.optimizer), sharded)
        if checkpoint is not None:
            scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate's wrapper, if any
            scheduler_follows_running_lrs(_unwrapped(self.optimizer), scheduler)

    trainer._load_optimizer_and_scheduler = types.MethodType(_load_optimizer_and_scheduler, trainer)


def _fsdp2_sharded_optimizer(trainer: transformers.Trainer, checkpoint: str | None) -> str | None:
    """The sharded (DCP) optimizer folder of `checkpoint` when this run resumes it under FSDP2, else None.

    Raises:
        ValueError: an FSDP2 checkpoint whose optimizer was saved whole (``FULL_STATE_DICT``), which is not tested.
    """
    if checkpoint is None or _fsdp_version(trainer) != 2:
        return None
    from accelerate.utils import OPTIMIZER_NAME

    directory = os.path.join(checkpoint, f"{OPTIMIZER_NAME}_0")
    if os.path.isdir(directory):
        return directory
    if os.path.isfile(os.path.join(checkpoint, f"{OPTIMIZER_NAME}.bin")):
        raise ValueError(
            f"{checkpoint} holds MoFaSGD's FSDP2 optimizer state as one file ({OPTIMIZER_NAME}.bin, saved with "
            "`state_dict_type: FULL_STATE_DICT`); enable_mofasgd resumes FSDP2 from sharded checkpoints only. Save "
            "with accelerate's default `SHARDED_STATE_DICT`, or start a new run from the checkpoint's weights."
        )
    return None  # no optimizer state: transformers loads none, as without FSDP


def _unwrapped(optimizer: Any) -> Any:
    """The MoFaSGD inside accelerate's AcceleratedOptimizer."""
    while not isinstance(optimizer, MoFaSGD) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer
