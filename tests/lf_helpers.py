"""Helpers for end-to-end LLaMA-Factory runs on the tiny model: configs, subprocess launch, log reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "mfsgd"
BIN = Path(sys.executable).parent


def conversation(*turns: str) -> list[dict]:
    """Chat messages alternating user / assistant, starting with the user."""
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


def encode_with_template(model_dir: Path, template: str, messages: list[dict], system: str | None = None):
    """The model's tokenizer and the (prompt ids, answer ids) pairs of `messages` under LLaMA-Factory's `template`."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=template))
    return tokenizer, chat.encode_multiturn(tokenizer, messages, system=system)


def tiny_config(name: str, model_dir: Path, output_dir: Path, **overrides) -> dict:
    """A tiny CPU config from configs/mfsgd with absolute paths, short schedule, no eval unless asked."""
    with open(CONFIGS / name) as f:
        config = yaml.safe_load(f)
    config.update(
        model_name_or_path=str(model_dir),
        dataset_dir=str(REPO / "data"),
        output_dir=str(output_dir),
        max_steps=6,
        save_steps=3,
        logging_steps=1,
        eval_strategy="no",
        plot_loss=False,
        disable_shuffling=True,
        dataloader_num_workers=0,
    )
    config.pop("eval_dataset", None)
    config.update(overrides)
    return config


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("FORCE_TORCHRUN", "NPROC_PER_NODE")}
    out.update(PYTHONHASHSEED="0", PATH=f"{BIN}{os.pathsep}{out.get('PATH', '')}", **extra)
    return out


def _write_config(config: dict, workdir: Path) -> Path:
    path = workdir / f"cfg_{len(list(workdir.glob('cfg_*.yaml')))}.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def _run(command: list[str], extra_env: dict | None, timeout: int):
    return subprocess.run(
        command,
        cwd=REPO,
        env=env(**(extra_env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def run_cli(config: dict, workdir: Path, extra_env: dict | None = None, timeout: int = 600):
    """`llamafactory-cli train <yaml>` in a subprocess; returns the CompletedProcess (stdout+stderr merged)."""
    return _run([str(BIN / "llamafactory-cli"), "train", str(_write_config(config, workdir))], extra_env, timeout)


def run_py(config: dict, workdir: Path, ngpus: int, base_output_dir: Path, timeout: int = 600):
    """`python run.py <yaml> --ngpus N --base_output_dir DIR` in a subprocess, like run_cli."""
    path = _write_config(config, workdir)
    command = [
        str(BIN / "python"),
        "run.py",
        str(path),
        "--ngpus",
        str(ngpus),
        "--base_output_dir",
        str(base_output_dir),
    ]
    return _run(command, None, timeout)


def assert_ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-6000:]


def log_history(output_dir: Path) -> list[dict]:
    """HF Trainer's per-step logs (loss, grad_norm, learning_rate) of a finished run."""
    with open(output_dir / "trainer_state.json") as f:
        return [entry for entry in json.load(f)["log_history"] if "loss" in entry]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))
