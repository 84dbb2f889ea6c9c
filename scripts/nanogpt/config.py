"""Run configuration: plain dataclasses, strict YAML/JSON layering and the descriptive run name.

A run is described by one nested mapping. It is built from layers, later ones winning:
``configs/optimizers/<optimizer>.yaml`` < ``--config-path`` YAML < ``--config`` JSON < command-line flags.
Every key is checked against the dataclasses and `HIDDEN_DEFAULTS` below, so a typo fails with the
dotted name of the key. The YAML and JSON layers may also use the authors' flat keys (``{"lr": ..., "rank": ...,
"warmup_steps": ..., "cooldown_frac": ...}``), mapped onto this layout by `nanogpt.authors_keys`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mofasgd import DEFAULTS as MOFASGD_DEFAULTS
from scripts.nanogpt.authors_keys import from_authors_keys

REPO_ROOT = Path(__file__).resolve().parents[2]
OPTIMIZER_CONFIG_DIR = REPO_ROOT / "configs" / "optimizers"
SCHEDULES = ("constant_cooldown", "cosine")
AUTOCAST_MODES = ("auto", "bf16", "none")

# MoFaSGD's `hidden` keys are its constructor options (mofasgd.DEFAULTS, the one table) except those the trainer
# sets itself: the Adam side from the `adam` section (adamw_state included: that side is torch's Adam here),
# data_parallel from the world size; and stochastic rounding
# (with its seed), which only bf16 weights use (these runs keep fp32 weights under autocast). The values are
# MoFaSGD's defaults, except where the authors' NanoGPT runs chose otherwise (configs/optimizers/mfsgd.yaml holds
# the same values; a test checks that it agrees).
_MFSGD_SET_BY_TRAINER = (
    "adam_betas",
    "adam_eps",
    "adamw_state",
    "fused_adamw_side",
    "data_parallel",
    "stochastic_rounding",
    "rounding_kernel",
    "seed",
)
_MFSGD_AUTHORS_NANOGPT = {
    "lr": 0.0009,
    "rank": 32,
    "beta": 0.95,
    "beta_start": 0.75,
    "beta_end": 0.95,
    "beta_warmup_steps": 300,
    "eta1": 0.25,
    "eps": 1e-6,
    "max_value": 1000.0,
    "use_current_projection": True,
}

# Hyperparameters of the optimizer that trains the hidden matrices: the known keys of the `hidden`
# section, their types and defaults. Defaults follow the authors' NanoGPT runs where they published
# them (MoFaSGD, GaLore, Muon's schedule); the AdamW and SGD values are ours.
HIDDEN_DEFAULTS: dict[str, dict[str, Any]] = {
    "mfsgd": {
        name: _MFSGD_AUTHORS_NANOGPT.get(name, default)
        for name, default in MOFASGD_DEFAULTS.items()
        if name not in _MFSGD_SET_BY_TRAINER
    },
    "galore": {
        "lr": 0.008,
        "rank": 32,
        "update_proj_gap": 150,
        "scale": 0.25,
        "proj_type": "std",
        "betas": (0.9, 0.999),
        "eps": 1e-6,
        "weight_decay": 0.0,
    },
    "adamw": {"lr": 0.0018, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, "fused": False},
    "muon": {
        "lr": 0.05,
        "momentum": 0.95,
        "momentum_start": 0.85,
        "momentum_warmup_steps": 300,
        "nesterov": True,
        "ns_steps": 5,
        "weight_decay": 0.0,
    },
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
}


@dataclass
class ModelConfig:
    """GPT shape. Defaults are the GPT-2 small size of the paper's runs."""

    vocab_size: int = 50304  # GPT-2's 50257 tokens padded to a multiple of 64
    depth: int = 12
    width: int = 768
    heads: int = 6
    rope_base: float = 10000.0
    logit_softcap: float = 30.0  # 0 turns it off


@dataclass
class DataConfig:
    """Token shards (glob patterns, relative to the repository root unless absolute)."""

    train_files: str = "outputs/nanogpt/data/fineweb10B/fineweb_train_*.bin"  # written by prepare_fineweb.py
    val_files: str = "outputs/nanogpt/data/fineweb10B/fineweb_val_*.bin"


@dataclass
class AdamConfig:
    """Adam for everything that is not a hidden matrix: embeddings, LM head, norm gains."""

    embed_lr: float = 0.05
    head_lr: float = 0.008
    scalar_lr: float = 0.04
    betas: tuple[float, float] = (0.8, 0.95)
    eps: float = 1e-10
    weight_decay: float = 0.0


@dataclass
class ScheduleConfig:
    """Learning-rate multiplier over the run, applied to every param group alike.

    ``constant_cooldown``: 1 until the last ``cooldown_frac`` of the steps, then linear down to
    ``min_lr_frac``. ``cosine``: half cosine from 1 to ``min_lr_frac``. Both start with a linear
    warm-up over ``warmup_steps`` when it is positive (the warm-up variants).
    """

    kind: str = "constant_cooldown"
    warmup_steps: int = 0
    cooldown_frac: float = 0.4
    min_lr_frac: float = 0.0


@dataclass
class TrainConfig:
    """Loop sizes, evaluation, device and checkpointing."""

    steps: int = 3000
    seq_len: int = 1024
    batch_tokens: int = 524288  # tokens per optimizer step over all processes (gradient accumulation fills it)
    micro_batch_size: int = 16  # sequences per forward pass per process
    val_every: int = 125
    val_tokens: int = 10485760
    log_every: int = 10
    grad_clip: float = 0.0  # 0 turns it off
    seed: int = 0
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1, ...
    autocast: str = "auto"  # auto: bf16 on CUDA, none on CPU
    compile: bool = False
    cpu_threads: int = 0  # torch intra-op threads; 0 keeps torch's default (1 is faster on a busy small CPU)
    checkpoint_every: int = 0  # 0: no checkpoints; the last step is always saved when positive
    resume_from: str | None = None


@dataclass
class MemProfConfig:
    """CUDA allocator history between two optimizer steps, dumped as a snapshot pickle (rank 0)."""

    enabled: bool = False
    start_step: int = 0  # 0 records from before the model is built
    stop_step: int = 3
    max_entries: int = 100000


@dataclass
class RunConfig:
    """Everything one training run needs."""

    optimizer: str
    hidden: dict[str, Any]
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adam: AdamConfig = field(default_factory=AdamConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mem_prof: MemProfConfig = field(default_factory=MemProfConfig)
    out_dir: str = "outputs/nanogpt"
    run_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested mapping (lists instead of tuples), ready for YAML."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def run_dir(self) -> Path:
        """Where logs, plots, summary and checkpoints go."""
        return resolve_path(self.out_dir) / (self.run_name or derive_run_name(self))


def resolve_path(path: str | Path) -> Path:
    """Relative paths in configs are relative to the repository root, so runs work from any directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of `default`, accepting the spellings YAML and JSON produce."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config key '{name}' must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{name}' must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        # PyYAML reads "1e-6" (no dot) as a string; accept it, since users write it that way.
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key '{name}' must be a number, got {value!r}") from None
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ValueError(f"config key '{name}' must be a list of {len(default)} values, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", v, d) for i, (v, d) in enumerate(zip(value, default)))
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"config key '{name}' must be a string, got {value!r}")
    return value


def _check_keys(section: str, given: dict[str, Any], known: list[str]) -> None:
    for key in given:
        if key not in known:
            dotted = f"{section}.{key}" if section else key
            raise ValueError(f"unknown config key '{dotted}' (known keys here: {', '.join(sorted(known))})")


def _build_section(cls: type, section: str, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config key '{section}' must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(section, values, list(fields))
    instance = cls()
    for key, value in values.items():
        setattr(instance, key, _coerce(f"{section}.{key}", value, getattr(instance, key)))
    return instance


def build_config(values: dict[str, Any]) -> RunConfig:
    """Validate a nested mapping into a RunConfig; unknown keys and bad values raise ValueError."""
    sections = {"model": ModelConfig, "data": DataConfig, "adam": AdamConfig, "schedule": ScheduleConfig}
    sections |= {"train": TrainConfig, "mem_prof": MemProfConfig}
    _check_keys("", values, ["optimizer", "hidden", "out_dir", "run_name", *sections])
    name = values.get("optimizer")
    if name not in HIDDEN_DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r} (choose from: {', '.join(HIDDEN_DEFAULTS)})")
    defaults = HIDDEN_DEFAULTS[name]
    hidden = values.get("hidden") or {}
    _check_keys("hidden", hidden, list(defaults))
    hidden = {key: _coerce(f"hidden.{key}", hidden.get(key, default), default) for key, default in defaults.items()}
    built = {key: _build_section(cls, key, values.get(key) or {}) for key, cls in sections.items()}
    config = RunConfig(optimizer=name, hidden=hidden, **built)
    config.out_dir = _coerce("out_dir", values.get("out_dir", config.out_dir), config.out_dir)
    config.run_name = values.get("run_name")
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Cross-field checks that a single type cannot express."""
    model, train, schedule = config.model, config.train, config.schedule
    if model.width % model.heads or (model.width // model.heads) % 2:
        raise ValueError(f"model.width ({model.width}) must split into model.heads ({model.heads}) even-sized heads")
    if schedule.kind not in SCHEDULES:
        raise ValueError(f"schedule.kind must be one of {SCHEDULES}, got {schedule.kind!r}")
    if not 0.0 <= schedule.cooldown_frac <= 1.0:
        raise ValueError(f"schedule.cooldown_frac must be in [0, 1], got {schedule.cooldown_frac}")
    if train.autocast not in AUTOCAST_MODES:
        raise ValueError(f"train.autocast must be one of {AUTOCAST_MODES}, got {train.autocast!r}")
    for key in ("steps", "seq_len", "batch_tokens", "micro_batch_size", "val_every", "log_every"):
        if getattr(train, key) <= 0:
            raise ValueError(f"train.{key} must be positive, got {getattr(train, key)}")
    if train.batch_tokens % (train.seq_len * train.micro_batch_size):
        raise ValueError(
            f"train.batch_tokens ({train.batch_tokens}) must be a multiple of "
            f"train.seq_len * train.micro_batch_size ({train.seq_len * train.micro_batch_size})"
        )
    for key, value in config.hidden.items():
        if key in ("rank", "update_proj_gap", "ns_steps") and value <= 0:
            raise ValueError(f"hidden.{key} must be positive, got {value}")
        if key in ("lr", "weight_decay") and value < 0:
            raise ValueError(f"hidden.{key} must not be negative, got {value}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must contain a YAML mapping, got {type(values).__name__}")
    return values


def load_config(
    optimizer: str,
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | str | None = None,
    flags: dict[str, Any] | None = None,
) -> RunConfig:
    """Layer base YAML, optional YAML, JSON overrides and flag overrides, then validate."""
    base_path = OPTIMIZER_CONFIG_DIR / f"{optimizer}.yaml"
    if not base_path.is_file():
        known = sorted(p.stem for p in OPTIMIZER_CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"unknown optimizer {optimizer!r}: no {base_path} (choose from: {', '.join(known)})")
    values = read_yaml(base_path)
    if values.get("optimizer", optimizer) != optimizer:
        raise ValueError(f"{base_path} declares optimizer {values['optimizer']!r}, expected {optimizer!r}")
    hidden_keys = list(HIDDEN_DEFAULTS.get(optimizer, {}))
    if config_path is not None:
        values = deep_merge(values, from_authors_keys(optimizer, read_yaml(config_path), hidden_keys))
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config is not valid JSON: {error}") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--config must be a JSON object, got {overrides!r}")
    values = deep_merge(values, from_authors_keys(optimizer, overrides or {}, hidden_keys))
    values = deep_merge(values, flags or {})
    if values.get("optimizer", optimizer) != optimizer:
        raise ValueError(f"the overrides set optimizer {values['optimizer']!r}, but --optimizer is {optimizer!r}")
    values["optimizer"] = optimizer
    return build_config(values)


def _number(value: float) -> str:
    return f"{value:g}"


def _hidden_name_parts(optimizer: str, hidden: dict[str, Any]) -> list[str]:
    lr = f"lr{_number(hidden['lr'])}"
    if optimizer == "mfsgd":
        return [f"r{hidden['rank']}", lr, f"eta{_number(hidden['eta1'])}", _beta_part(hidden)]
    if optimizer == "galore":
        return [f"r{hidden['rank']}", lr, f"gap{hidden['update_proj_gap']}", f"sc{_number(hidden['scale'])}"]
    if optimizer == "adamw":
        return [lr, f"b{_number(hidden['betas'][0])}-{_number(hidden['betas'][1])}"]
    return [lr, f"m{_number(hidden['momentum'])}"]


def _beta_part(hidden: dict[str, Any]) -> str:
    if hidden["beta_warmup_steps"] > 0:
        return f"b{_number(hidden['beta_start'])}-{_number(hidden['beta_end'])}"
    return f"b{_number(hidden['beta'])}"


def derive_run_name(config: RunConfig) -> str:
    """Descriptive, filesystem-safe name: optimizer, its key hyperparameters, model, batch, steps, schedule."""
    model, train, schedule = config.model, config.train, config.schedule
    parts = [config.optimizer, *_hidden_name_parts(config.optimizer, config.hidden)]
    parts += [f"d{model.depth}w{model.width}", f"T{train.seq_len}", f"bt{train.batch_tokens}", f"s{train.steps}"]
    if schedule.kind == "cosine":
        parts.append("cos")
    else:
        parts.append(f"cd{_number(schedule.cooldown_frac)}")
    if schedule.warmup_steps:
        parts.append(f"wu{schedule.warmup_steps}")
    if train.seed:
        parts.append(f"seed{train.seed}")
    return "_".join(parts)
