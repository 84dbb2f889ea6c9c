"""docs/python_api.md: the "Plain transformers / TRL" example runs as written and trains with MoFaSGD."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _example() -> str:
    page = REPO.joinpath("docs", "python_api.md").read_text(encoding="utf-8")
    section = page.split("## Plain transformers / TRL", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_documented_transformers_example_trains_with_mofasgd(tiny_model, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-llama").symlink_to(tiny_model)
    (tmp_path / "data").symlink_to(REPO / "data")
    check = (
        "\nfrom mofasgd import MoFaSGD\n"
        "assert isinstance(trainer.optimizer.optimizer, MoFaSGD)\n"
        "print('LOSSES', [h['loss'] for h in trainer.state.log_history if 'loss' in h])\n"
    )
    script = tmp_path / "example.py"
    script.write_text(_example() + check, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = eval(proc.stdout.split("LOSSES", 1)[1].strip().splitlines()[0])
    assert losses[-1] < losses[0] - 0.2, losses  # it really trains (mean losses of steps 1-10 and 11-20)
