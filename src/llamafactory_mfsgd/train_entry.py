"""Train one LLaMA-Factory config with the extension verified active: `python -m llamafactory_mfsgd.train_entry CFG`.

run.py runs this in-process for one process and under torchrun for several; unlike relying on the .pth
start-up hook alone, it fails before training if the extension is not in effect in this interpreter.
"""

from __future__ import annotations

import sys
from typing import Any

from .activation import assert_active
from .config_values import load_config


def train(config_path: str, callbacks: list[Any] | None = None) -> None:
    """Activate (or verify) the extension, then run LLaMA-Factory's training entry on `config_path`.

    The YAML is read like every other path reads it (:func:`config_values.load_config`); `callbacks` (Trainer
    callbacks) go to the trainer next to the extension's own.
    """
    assert_active()
    from llamafactory.train.tuner import run_exp

    run_exp(load_config(config_path), callbacks=callbacks)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m llamafactory_mfsgd.train_entry CONFIG.yaml")
    train(sys.argv[1])
