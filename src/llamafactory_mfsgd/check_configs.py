"""Check training YAMLs (ours or the authors') without a GPU: parse, resolve the datasets, build the scheduler.

    mfsgd-check-configs path/to/llama-factory-mfsgd/configs/mfsgd/*.yaml path/to/.../configs/tulu3_mix/*.yaml
    python -m llamafactory_mfsgd.check_configs CFG.yaml ... [--dataset-dir data] [--model PATH]

For each config (in one process per ``deepspeed:`` value, since accelerate and transformers keep the distributed
and DeepSpeed state of a process):
``output_dir`` goes to a temporary directory (and ``model_name_or_path`` to ``--model`` if given; parsing
never loads the model), a bf16-capable GPU is emulated for the ``bf16``/``pure_bf16`` device checks, and a
``deepspeed:`` config gets a one-process torchrun environment, as ``FORCE_TORCHRUN=1`` would give it. Then

1. it is read as training reads it (:func:`config_values.load_config`: unquoted ``1e-5`` is a number, a repeated
   key is refused), and LLaMA-Factory's real argument parser (with this extension) parses it: every key, every
   parse-time check, and the preparation of ``tulu3_mixture_*`` datasets (which needs internet, or a prepared
   dataset directory, or ``MFSGD_TULU3_MIXTURE`` pointing at a local copy of the mixture);
2. its datasets resolve through ``dataset_info.json`` to files that exist (or to hub ids);
3. its learning-rate scheduler is built as training builds it, on a dummy optimizer, for ``max_steps`` or 1000
   steps, and stepped to the end.

It prints one line per config and exits non-zero if any fails. Paths inside a config (``deepspeed:``,
``dataset_dir``) are relative to the current directory, as for ``llamafactory-cli``: run it from the repository
root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .config_values import load_config
from .launcher import free_port

RESULT_PREFIX = "@@check-configs "
TRIAL_STEPS = 1000


def _emulate_bf16_gpu() -> None:
    """Let the bf16 / pure_bf16 device checks of transformers and LLaMA-Factory pass on a machine without one."""
    import llamafactory.hparams.parser as lf_parser
    import transformers.training_args as hf_training_args

    hf_training_args.is_torch_bf16_gpu_available = lambda: True
    lf_parser.is_torch_bf16_gpu_available = lambda: True


def _scheduler_summary(training_args: Any, steps: int) -> str:
    """Build the run's scheduler as the trainers do (LLaMA-Factory's hook, then HF's get_scheduler); step it."""
    from .schedulers import lr_factors

    factors = lr_factors(training_args, steps)
    name = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    kwargs = training_args.lr_scheduler_kwargs or {}
    return (
        f"{name}{json.dumps(kwargs, sort_keys=True) if kwargs else ''} over {steps} steps: "
        f"lr x{factors[0]:.2f} -> x{max(factors):.2f} -> x{factors[-1]:.2f}"
    )


def _datasets_summary(data_args: Any) -> str:
    """Resolve the training and eval datasets as LLaMA-Factory's loader does; local files must exist."""
    from llamafactory.data.parser import get_dataset_list

    names = [*(data_args.dataset or []), *(data_args.eval_dataset or [])]
    resolved = []
    for attr in get_dataset_list(names, data_args.dataset_dir):
        if attr.load_from == "file":
            path = Path(data_args.dataset_dir) / attr.dataset_name
            if not path.exists():
                raise FileNotFoundError(f"dataset file {path} does not exist")
            resolved.append(f"{path} ({sum(1 for _ in open(path, encoding='utf-8'))} rows)")
        else:
            resolved.append(f"{attr.load_from}:{attr.dataset_name}")
    return ", ".join(resolved)


def check_one(config_path: str, dataset_dir: str | None, model: str | None, output_dir: str) -> str:
    """Parse one config, resolve its datasets, build its scheduler; return a one-line summary (raises on failure)."""
    from .activation import assert_active

    assert_active()
    _emulate_bf16_gpu()
    from llamafactory.hparams import get_train_args

    config = load_config(config_path)  # as training reads it: `1e-5` is a number, a repeated key is refused
    config["output_dir"] = output_dir
    if model:
        config["model_name_or_path"] = model
    if dataset_dir:
        config["dataset_dir"] = dataset_dir
    _, data_args, training_args, finetuning_args, _ = get_train_args(config)
    steps = training_args.max_steps if training_args.max_steps and training_args.max_steps > 0 else TRIAL_STEPS
    method = next((k[4:] for k in ("use_mfsgd", "use_galore", "use_muon") if getattr(finetuning_args, k)), "")
    engine = f", DeepSpeed {Path(training_args.deepspeed).name}" if training_args.deepspeed else ""
    return (
        f"{finetuning_args.finetuning_type}{'/' + method if method else ''}{engine}; "
        f"datasets: {_datasets_summary(data_args)}; scheduler: {_scheduler_summary(training_args, steps)}"
    )


def _deepspeed_of(config_path: str) -> str | None:
    """The config's `deepspeed:` value; None when the file does not load (its child process then reports why)."""
    try:
        return load_config(config_path).get("deepspeed") or None
    except (OSError, ValueError):
        return None


def _child_env(deepspeed: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if deepspeed and "RANK" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return env


def main(argv: list[str] | None = None) -> int:
    """Check every config in its own process; print one line each; non-zero exit if any fails."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="training YAMLs")
    parser.add_argument("--dataset-dir", help="override every config's dataset_dir (e.g. a prepared data/)")
    parser.add_argument("--model", help="override model_name_or_path (parsing does not load it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one group, in a child process
    args = parser.parse_args(argv)

    if args.child:
        for config in args.configs:
            with tempfile.TemporaryDirectory(prefix="check-configs-") as output_dir:
                try:
                    line = "OK    " + check_one(config, args.dataset_dir, args.model, output_dir)
                except Exception as error:  # any failure of this config is its result
                    line = f"FAIL  {type(error).__name__}: {error}"
            print(RESULT_PREFIX + json.dumps([config, line]), flush=True)
        return 0

    groups: dict[str | None, list[str]] = {}
    for config in args.configs:
        groups.setdefault(_deepspeed_of(config), []).append(config)
    results: dict[str, str] = {}
    for deepspeed, configs in groups.items():
        command = [sys.executable, "-m", "llamafactory_mfsgd.check_configs", "--child", *configs]
        command += [f"--dataset-dir={args.dataset_dir}"] if args.dataset_dir else []
        command += [f"--model={args.model}"] if args.model else []
        proc = subprocess.run(command, env=_child_env(deepspeed), capture_output=True, text=True, check=False)
        for ln in proc.stdout.splitlines():
            if RESULT_PREFIX in ln:
                config, line = json.loads(ln.split(RESULT_PREFIX, 1)[1])
                results[config] = line
        for config in configs:
            results.setdefault(config, f"FAIL  crashed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    failures = 0
    for config in args.configs:
        failures += not results[config].startswith("OK")
        print(f"{config}\n  {results[config]}", flush=True)
    print(f"{len(args.configs) - failures}/{len(args.configs)} configs parse, resolve their datasets and build "
          "their scheduler.")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
