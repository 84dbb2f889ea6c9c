"""Train one LLaMA-Factory config with the extension verified active: `python -m llamafactory_mfsgd.train_entry CFG`.

run.py runs this in-process for one process and under torchrun for several; unlike relying on the .pth
start-up hook alone, it fails before training if the extension is not in effect in this interpreter.
"""

from __future__ import annotations

import sys

import yaml

from .activation import assert_active


def train(config_path: str) -> None:
    """Activate (or verify) the extension, then run LLaMA-Factory's training entry on `config_path`."""
    assert_active()
    from llamafactory.train.tuner import run_exp

    with open(config_path) as f:
        run_exp(yaml.safe_load(f))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m llamafactory_mfsgd.train_entry CONFIG.yaml")
    train(sys.argv[1])
