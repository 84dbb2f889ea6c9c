"""Drive LlamaBoard (LLaMA-Factory's WebUI) without a browser: its runner's events with a {component: value} dict."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class Board:
    """A built LlamaBoard UI, its runner and engine, and the values of the Train tab's inputs."""

    def __init__(self) -> None:
        from llamafactory.webui.interface import create_ui

        self.demo = create_ui()
        self.events = {f.fn.__name__: f for f in self.demo.fns.values() if hasattr(f.fn, "__name__")}
        self.runner = self.events["preview_train"].fn.__self__
        self.engine = self.events["change_lang"].fn.__self__
        self.manager = self.runner.manager
        self.data = {elem: elem.value for elem in self.events["preview_train"].inputs}

    def elem(self, elem_id: str) -> Any:
        return self.manager.get_elem_by_id(elem_id)

    def set(self, values: dict[str, Any]) -> Board:
        for elem_id, value in values.items():
            self.data[self.elem(elem_id)] = value
        return self

    def value(self, elem_id: str) -> Any:
        return self.data[self.elem(elem_id)]

    def output(self, event) -> str:
        """The output box's text after the last update of a runner event (a generator or a dict)."""
        updates = event(self.data)
        last = updates if isinstance(updates, dict) else list(updates)[-1]
        return last[self.elem("train.output_box")]

    def preview(self) -> str:
        return self.output(self.runner.preview_train)


def base_values(model_path: str, **overrides: Any) -> dict[str, Any]:
    """Train-tab values for a full fine-tuning run of the tiny model on the local demo data, MoFaSGD checked."""
    values = {
        "top.lang": "en",
        "top.model_name": "tiny-llama",
        "top.model_path": model_path,
        "top.finetuning_type": "full",
        "top.template": "tulu_v3",
        "train.dataset_dir": str(REPO / "data"),
        "train.dataset": ["tulu3_demo"],
        "train.compute_type": "fp32",
        "train.cutoff_len": 128,
        "train.output_dir": "run",
        "train.config_path": "cfg.yaml",
        "train.extra_args": "{}",
        "train.use_mfsgd": True,
    }
    values.update(overrides)
    return values


def command_keys(preview: str) -> dict[str, str]:
    """`--key value` pairs of LlamaBoard's command preview (a fenced bash block, one key per line)."""
    return dict(re.findall(r"^\s+--(\S+) (.*?) (?:\\)?$", preview, re.MULTILINE))
