"""CPU demo: tiny LLaMA, local Tulu3-format data, MoFaSGD through the real LLaMA-Factory pipeline, in a few minutes.

    python -m scripts.demo [--config configs/mfsgd/tiny_sft_mfsgd.yaml] [--out outputs/demo] [key=value ...]

Any tiny config runs the same way, e.g. ``--config configs/mfsgd/tiny_dpo_mfsgd.yaml`` (pt, dpo, kto, rm:
docs/stages.md).

Builds the tiny model if it is missing, trains with `python run.py` semantics (named run directory, resolved
config) and a memory profile of the first optimizer steps, then prints where the loss curve, the memory
report and the run directory are, with the first/last training loss and the eval loss.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from scripts.build_tiny_llama import ensure_built

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "mfsgd" / "tiny_sft_mfsgd.yaml"))
    parser.add_argument("--out", default=str(REPO / "outputs" / "demo"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    args = parser.parse_intermixed_args()

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.chdir(REPO)
    ensure_built(REPO / "models" / "tiny-llama")

    from llamafactory_mfsgd.launcher import main as launch

    overrides = ["profile_memory_from_start=true", "profile_memory_stop_step=2", *args.overrides]
    launch([args.config, "--ngpus", "1", "--base_output_dir", args.out, *overrides])

    run_dir = max(Path(args.out).iterdir(), key=lambda p: p.stat().st_mtime)
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    stage = yaml.safe_load((run_dir / "run_config.yaml").read_text()).get("stage", "sft")
    print(f"\n[demo] MoFaSGD on the tiny LLaMA, through llamafactory's `stage: {stage}` pipeline (CPU)")
    print(f"[demo] training loss: {losses[0]:.3f} (first logged) -> {losses[-1]:.3f} (last)")
    if evals:
        print(f"[demo] eval loss: {' -> '.join(f'{v:.3f}' for v in evals)}")
    print(f"[demo] loss curve:    {run_dir / 'training_loss.png'}")
    print(f"[demo] memory report: {run_dir / 'memory_summary.md'} (+ memory_timeline.png)")
    print(f"[demo] run directory: {run_dir}")


if __name__ == "__main__":
    main()
