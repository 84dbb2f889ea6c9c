"""A bf16 model trained by HF Trainer with MoFaSGD resumes from its checkpoint (issue 9, case 8) bit-exactly."""

import pytest
import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from mofasgd import MoFaSGD, split_for_mofasgd

pytestmark = pytest.mark.slow


class Tokens(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, index):
        ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids.clone()}


def build_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config).to(torch.bfloat16)


def run(output_dir, max_steps, resume=None):
    model = build_model()
    routing = split_for_mofasgd(model)
    optimizer = MoFaSGD(
        [
            {"params": [p for _, p in routing.mofasgd], "param_names": [n for n, _ in routing.mofasgd]},
            {"params": [p for _, p in routing.adamw], "param_names": [n for n, _ in routing.adamw], "mofasgd": False},
        ],
        lr=1e-2,
        rank=4,
        seed=7,
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        save_steps=3,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizer


def test_bf16_model_resumes_through_the_trainer_checkpoint_bit_exactly(tmp_path):
    reference, _ = run(tmp_path / "full", 6)
    run(tmp_path / "first", 3)
    resumed, optimizer = run(tmp_path / "first", 6, resume=str(tmp_path / "first" / "checkpoint-3"))
    managed = [p for g in optimizer.param_groups if g["mofasgd"] for p in g["params"]]
    assert managed and all(optimizer.state[p]["U"].dtype == torch.float32 for p in managed)
    assert next(resumed.parameters()).dtype == torch.bfloat16
    for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
