"""Which parameters take weight decay under MoFaSGD: exactly those the HF Trainer's own AdamW decays (no norms)."""

import llamafactory.train.trainer_utils  # noqa: F401  (applies the extension's patches)
import pytest
import torch
from lf_helpers import tiny_config
from llamafactory.hparams import get_train_args
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, Trainer, TrainingArguments

from llamafactory_mfsgd.optimizer_factory import create_mfsgd_optimizer

SHAPES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPES)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPES)),  # q_norm / k_norm inside attention
}
WEIGHT_DECAY = 0.1


def _optimizer(tmp_path, model, **change):
    config = tiny_config("tiny_sft_mfsgd.yaml", tmp_path / "no-model-needed", tmp_path / "out")
    _, _, training_args, finetuning_args, _ = get_train_args({**config, "weight_decay": WEIGHT_DECAY, **change})
    return create_mfsgd_optimizer(model, training_args, finetuning_args)


def _trainer_decay_names(tmp_path, model) -> set[str]:
    """The names the stock HF Trainer (the AdamW baseline's optimizer) puts in its weight-decay group."""
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], use_cpu=True)
    return set(Trainer(model=model, args=args).get_decay_parameter_names(model))


def _decayed_names(optimizer) -> set[str]:
    return {n for g in optimizer.param_groups if g["weight_decay"] > 0 for n in g["param_names"]}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_decay_groups_are_the_hf_trainers_and_leave_every_norm_out(tmp_path, arch):
    torch.manual_seed(0)
    model = MODELS[arch]()
    optimizer = _optimizer(tmp_path, model)
    optimizer.remove_hooks()
    names = {n for n, _ in model.named_parameters()}
    norms = {n for n in names if "norm" in n}
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight"} <= norms
    if arch == "qwen3":
        assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= norms
    assert _decayed_names(optimizer) == _trainer_decay_names(tmp_path, model) == names - norms


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_norm_weights_do_not_shrink_under_weight_decay_with_zero_gradients(tmp_path, arch):
    torch.manual_seed(0)
    model = MODELS[arch]()
    optimizer = _optimizer(tmp_path, model, mfsgd_fused=False)
    params = dict(model.named_parameters())
    for p in params.values():  # a visibly non-trivial norm weight, so decay would show
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(5):
        for p in params.values():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    norms = [n for n in params if "norm" in n]
    for name in norms:
        torch.testing.assert_close(params[name], before[name], rtol=0, atol=0, msg=name)
    # the decay itself is on: the embeddings (AdamW side, zero gradient) shrink by (1 - lr wd) per step
    embed = "model.embed_tokens.weight"
    assert params[embed].norm() < before[embed].norm() * (1 - 1e-2 * WEIGHT_DECAY) ** 4
