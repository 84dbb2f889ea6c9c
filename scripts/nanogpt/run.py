"""Launch one NanoGPT run: layer the configs, name the run, write its config, start the trainer.

    python -m scripts.nanogpt.run --optimizer mfsgd                                   # paper-size run, FineWeb
    python -m scripts.nanogpt.run --optimizer mfsgd --config-path scripts/nanogpt/cpu.yaml   # tiny, CPU, offline
    python -m scripts.nanogpt.run --optimizer galore --config '{"hidden": {"rank": 8}}' --num-gpus 8

Layers, later ones winning: configs/optimizers/<optimizer>.yaml, --config-path YAML, --config JSON,
then the shortcut flags (--width, --depth, --seq-len, --steps, --device, ...). With --num-gpus N > 1
the trainer runs under torchrun with N processes (one per GPU; on a CPU-only machine, N gloo processes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from scripts.nanogpt.build_offline_corpus import DEFAULT_OUT_DIR, build_offline_corpus
from scripts.nanogpt.config import (
    HIDDEN_DEFAULTS,
    REPO_ROOT,
    RunConfig,
    derive_run_name,
    load_config,
    resolve_path,
)

TRAINER = "scripts.nanogpt.train"  # run as a module from the repository root (REPO_ROOT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", required=True, choices=list(HIDDEN_DEFAULTS))
    parser.add_argument("--config", help='JSON object merged over the YAML layers, e.g. \'{"hidden": {"rank": 8}}\'')
    parser.add_argument("--config-path", help="YAML merged over configs/optimizers/<optimizer>.yaml")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (torchrun when > 1)")
    parser.add_argument("--width", type=int, help="model.width")
    parser.add_argument("--depth", type=int, help="model.depth")
    parser.add_argument("--heads", type=int, help="model.heads")
    parser.add_argument("--seq-len", type=int, help="train.seq_len")
    parser.add_argument("--steps", type=int, help="train.steps")
    parser.add_argument("--device", help="train.device: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--out-dir", help="parent of the run directory (default outputs/nanogpt)")
    parser.add_argument("--run-name", help="run directory name (default: derived from the config)")
    parser.add_argument("--resume-from", help="checkpoint to continue from")
    parser.add_argument("--mem-prof", action="store_true", help="record a CUDA memory snapshot")
    parser.add_argument("--mem-prof-start-step", type=int, help="optimizer step to start recording at (0: from start)")
    parser.add_argument("--mem-prof-stop-step", type=int, help="optimizer steps after which the snapshot is dumped")
    parser.add_argument("--mem-prof-max-entries", type=int, help="allocator events kept")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and command, run nothing")
    args = parser.parse_args(argv)
    if args.num_gpus < 1:
        parser.error(f"--num-gpus must be at least 1, got {args.num_gpus}")
    return args


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The shortcut flags as a nested override mapping (only flags that were given)."""
    places = {
        "width": ("model", "width"),
        "depth": ("model", "depth"),
        "heads": ("model", "heads"),
        "seq_len": ("train", "seq_len"),
        "steps": ("train", "steps"),
        "device": ("train", "device"),
        "resume_from": ("train", "resume_from"),
        "mem_prof_start_step": ("mem_prof", "start_step"),
        "mem_prof_stop_step": ("mem_prof", "stop_step"),
        "mem_prof_max_entries": ("mem_prof", "max_entries"),
    }
    overrides: dict[str, Any] = {}
    for flag, (section, key) in places.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.mem_prof:
        overrides.setdefault("mem_prof", {})["enabled"] = True
    for key in ("out_dir", "run_name"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return overrides


def resolve(args: argparse.Namespace) -> RunConfig:
    """The validated config of this invocation, with its run name filled in."""
    config = load_config(args.optimizer, args.config_path, args.config, flag_overrides(args))
    config.run_name = config.run_name or derive_run_name(config)
    return config


def launch_command(config_file: Path, num_gpus: int) -> list[str]:
    """The trainer's command line: plain Python for one process, torchrun (as a module) for several."""
    if num_gpus == 1:
        return [sys.executable, "-m", TRAINER, "--config-file", str(config_file)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_gpus}"]
    return [*torchrun, "-m", TRAINER, "--config-file", str(config_file)]


def ensure_offline_corpus(config: RunConfig) -> None:
    """Build the offline corpus on first use when the config points at its default location."""
    corpus_dir = resolve_path(DEFAULT_OUT_DIR)
    train_pattern = resolve_path(config.data.train_files)
    if train_pattern.parent == corpus_dir and not list(corpus_dir.glob(train_pattern.name)):
        print(f"building the offline corpus in {corpus_dir} (once; a few seconds)", flush=True)
        build_offline_corpus(corpus_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = resolve(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_dir = config.run_dir
    config_file = run_dir / "config.yaml"
    command = launch_command(config_file, args.num_gpus)
    if args.dry_run:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        print(f"run name: {config.run_name}\ncommand: {' '.join(command)}")
        return 0
    ensure_offline_corpus(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    print(f"run {config.run_name} -> {run_dir}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(command, cwd=REPO_ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
