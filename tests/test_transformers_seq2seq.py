"""enable_mofasgd on transformers' Seq2SeqTrainer (a Trainer subclass with its own arguments class).

TRL 0.24's DPOTrainer is not tested here: under transformers 5.6 it does not import (it reads the (available,
version) tuples of transformers' package checks as true) and, past that, its __init__ reads
``model.warnings_issued``, which transformers 5 removed. LLaMA-Factory's ``stage: dpo``
(tests/test_llamafactory_stages.py) is the DPO path that runs here.
"""

from __future__ import annotations

import torch
from hf_trainers import make_trainer

from mofasgd import MoFaSGD
from mofasgd.integrations.transformers import enable_mofasgd


def _unwrapped(trainer) -> MoFaSGD:
    optimizer = trainer.optimizer
    while not isinstance(optimizer, MoFaSGD):
        optimizer = optimizer.optimizer
    return optimizer


def _hidden(model) -> dict[str, torch.nn.Parameter]:
    excluded = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and id(p) not in excluded}


def test_seq2seq_trainer_builds_mofasgd(tiny_model, tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    plain = make_trainer("trainer", tiny_model, tmp_path, max_steps=2)
    trainer = Seq2SeqTrainer(
        model=plain.model,
        args=Seq2SeqTrainingArguments(**{**plain.args.to_dict(), "output_dir": str(tmp_path)}),
        train_dataset=plain.train_dataset,
    )
    enable_mofasgd(trainer, rank=4, lr=1e-2, adamw_lr=1e-3)
    hidden = _hidden(trainer.model)
    before = {n: p.detach().clone() for n, p in hidden.items()}
    trainer.train()
    optimizer = _unwrapped(trainer)
    for name, p in hidden.items():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not move"
        assert {"U", "S", "V"} <= set(optimizer.state[p]), name
