"""`python run.py CONFIG [--ngpus N] [--base_output_dir DIR] [key=value ...]`: name, record and launch a run.

The run name is derived from the config (model, data, stage unless sft, method and rank, effective batch, learning
rates, scheduler); the resolved config is written to ``<base_output_dir>/<run_name>/run_config.yaml`` (and, under the
authors' name, ``training_config.yaml``) and training starts on N processes: in this process for N = 1, through
torchrun otherwise. Multi-node runs honour the usual torchrun variables (NNODES, NODE_RANK, MASTER_ADDR,
MASTER_PORT) like llamafactory-cli does.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mofasgd import DEFAULTS

from .config_values import load_config, parse_scalar
from .cuda_cache import ENV as CUDA_CACHE_ENV
from .key_types import check_extension_types

USAGE = (
    "python run.py CONFIG.yaml [--ngpus N] [--base_output_dir DIR] [--enable_mfsgd_debug_empty_cache] [key=value ...]"
)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def method_tag(config: dict[str, Any]) -> str:
    """Short method description: mfsgd-r8, galore-fused-r8, lora-r8, freeze, full-adamw ..."""
    if config.get("use_mfsgd"):
        tag = f"mfsgd-r{config.get('mfsgd_rank', DEFAULTS['rank'])}"
        if config.get("mfsgd_nesterov"):
            tag += "-nesterov"
        if config.get("mfsgd_use_ones_for_nonzero_s"):
            tag += "-s1"
        return tag
    if config.get("use_galore"):
        return f"galore{'-fused' if config.get('galore_fused') else ''}-r{config.get('galore_rank', 16)}"
    if config.get("use_apollo"):
        return f"apollo-r{config.get('apollo_rank', 16)}"
    if config.get("use_muon"):
        return "muon"
    finetuning_type = config.get("finetuning_type", "lora")
    if finetuning_type == "lora":
        return f"lora-r{config.get('lora_rank', 8)}"
    return "full-adamw" if finetuning_type == "full" else finetuning_type


def run_name(config: dict[str, Any], ngpus: int) -> str:
    """A descriptive, filesystem-safe name for the run."""
    model = Path(str(config.get("model_name_or_path", "model")).rstrip("/")).name
    dataset = str(config.get("dataset", "data")).replace(",", "+")
    batch = int(config.get("per_device_train_batch_size", 1)) * int(config.get("gradient_accumulation_steps", 1))
    stage = str(config.get("stage", "sft"))
    method = method_tag(config) if stage == "sft" else f"{stage}-{method_tag(config)}"
    parts = [model, dataset, method, f"bs{batch * ngpus}"]
    if config.get("use_mfsgd") and (config.get("learning_rate_mfsgd") or config.get("learning_rate_adamw")):
        lr = config.get("learning_rate")
        parts.append(f"mflr{_fmt(config.get('learning_rate_mfsgd', lr))}")
        parts.append(f"adlr{_fmt(config.get('learning_rate_adamw', lr))}")
    elif "learning_rate" in config:
        parts.append(f"lr{_fmt(config['learning_rate'])}")
    parts.append(str(config.get("lr_scheduler_type", "linear")))
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts))


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides, each value read as YAML reads it unquoted (like llamafactory-cli's overrides)."""
    result = dict(config)
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"Override {item!r} is not of the form key=value.")
        key, value = item.split("=", 1)
        result[key.strip()] = parse_scalar(value)
    return result


def free_port() -> int:
    """A TCP port that is free on this machine right now (for a local torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(config_path: Path, ngpus: int) -> list[str]:
    """The torchrun command that runs `llamafactory_mfsgd.train_entry` on every process."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [
        torchrun,
        "--nnodes",
        os.environ.get("NNODES", "1"),
        "--node_rank",
        os.environ.get("NODE_RANK", "0"),
        "--nproc_per_node",
        str(ngpus),
        "--master_addr",
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "--master_port",
        os.environ.get("MASTER_PORT") or str(free_port()),
        "-m",
        "llamafactory_mfsgd.train_entry",
        str(config_path),
    ]


def prepare_run(config_file: str, ngpus: int, base_output_dir: str, overrides: list[str]) -> tuple[Path, dict]:
    """Resolve and check the config, then create the run directory and write the resolved config there.

    Raises:
        ValueError: the YAML is empty, not a mapping, repeats a key, or gives an extension key a value of the
            wrong type; raised before any directory is created.
    """
    config = apply_overrides(load_config(config_file), overrides)
    check_extension_types(config)
    name = run_name(config, ngpus)
    run_dir = Path(base_output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config["output_dir"] = str(run_dir)
    config.setdefault("run_name", name)
    resolved = run_dir / "run_config.yaml"
    with open(resolved, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    shutil.copyfile(resolved, run_dir / "training_config.yaml")  # the name the authors' analysis scripts read
    return resolved, config


def main(argv: list[str] | None = None) -> int:
    """Entry point of run.py."""
    parser = argparse.ArgumentParser(
        prog="run.py",
        usage=USAGE,
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python run.py configs/mfsgd/tiny_sft_mfsgd.yaml --ngpus 2 mfsgd_rank=16",
    )
    parser.add_argument(
        "config", nargs="+", metavar="CONFIG.yaml", help="LLaMA-Factory training YAML, then key=value overrides"
    )
    parser.add_argument(
        "--ngpus", type=int, default=1, metavar="N", help="processes per node (GPUs; CPU processes without CUDA)"
    )
    parser.add_argument(
        "--base_output_dir", default="saves", metavar="DIR", help="parent directory of the run directory"
    )
    parser.add_argument(
        "--enable_mfsgd_debug_empty_cache",
        action="store_true",
        help=f"set {CUDA_CACHE_ENV}=1: release cached CUDA blocks after each MoFaSGD gradient hook (memory debugging)",
    )
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_intermixed_args(argv)
    if args.ngpus < 1:
        parser.error("--ngpus must be >= 1")

    try:
        resolved, config = prepare_run(args.config[0], args.ngpus, args.base_output_dir, args.config[1:])
    except (OSError, ValueError) as error:
        raise SystemExit(f"run.py: {error}") from None
    os.environ.setdefault("WANDB_NAME", config["run_name"])
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.enable_mfsgd_debug_empty_cache:
        os.environ[CUDA_CACHE_ENV] = "1"
    print(
        f"[run.py] run: {config['run_name']}\n[run.py] directory: {config['output_dir']}\n[run.py] config: {resolved}"
    )
    if args.ngpus == 1 and int(os.environ.get("NNODES", "1")) == 1:
        from .train_entry import train

        train(str(resolved))
        return 0
    return subprocess.run(torchrun_command(resolved, args.ngpus), check=False).returncode
