"""Plain transformers / TRL trainers on the tiny local model, for the tests of mofasgd.integrations.transformers.

``make_trainer(kind, ...)`` builds a ``transformers.Trainer`` (``kind="trainer"``: random token sequences, every
token a label) or TRL's ``SFTTrainer`` (``kind="sft"``: the bundled Tulu-3-format conversations, the loss on the
assistant turns). Both read their batches in order (``train_sampling_strategy="sequential"``), so that runs can be
compared step by step, and train fp32 on the CPU. Used in-process by the tests and by ``hf_ddp_worker.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
KINDS = ("trainer", "sft")


def token_rows(count: int = 32, length: int = 16, vocab: int = 900, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token sequences of one length (every token a label), the same for every seed."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (length,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def conversations(count: int = 32) -> list[dict[str, Any]]:
    """The first `count` conversations of data/tulu3_demo.jsonl, as TRL's conversational `messages` rows."""
    with open(REPO / "data" / "tulu3_demo.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(count))]
    return [{"messages": row["messages"]} for row in rows]


def make_trainer(kind: str, model_dir: Path | str, output_dir: Path | str, **arguments: Any) -> Any:
    """A trainer of `kind` on a fresh copy of the tiny model; `arguments` override the training arguments."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    common = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    common.update(arguments)
    if kind == "trainer":
        from transformers import Trainer, TrainingArguments

        return Trainer(model=model, args=TrainingArguments(**common), train_dataset=token_rows())
    if kind == "sft":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(
            model=model,
            args=SFTConfig(max_length=64, **common),
            train_dataset=Dataset.from_list(conversations()),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
        )
    raise ValueError(f"unknown trainer kind {kind!r}; expected one of {KINDS}")
