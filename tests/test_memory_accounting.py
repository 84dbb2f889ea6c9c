"""The meta-device accounting agrees with what the real optimizers hold on a real tiny LLaMA in bf16."""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from galore_fused import FusedGaLoreAdamW
from galore_torch import GaLoreAdamW
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mofasgd import MoFaSGD

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "llama_memory_accounting.py"
RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_script():
    spec = importlib.util.spec_from_file_location("llama_memory_accounting", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


acc = load_script()


def tiny_config(tied: bool, **changes) -> LlamaConfig:
    default = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "vocab_size": 320}
    return LlamaConfig(
        **{**default, **changes}, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied
    )


def real_model(config: LlamaConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def rows(config: LlamaConfig, **kw) -> dict:
    return {r.method: r for r in acc.account(config, rank=RANK, **kw)}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def hidden_linears(model: LlamaForCausalLM) -> list[nn.Parameter]:
    """LLaMA-Factory's `all` target: every nn.Linear except the LM head."""
    return [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in name]


def other_params(model: nn.Module, chosen: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in model.parameters() if all(p is not c for c in chosen)]


def backward_once(model: LlamaForCausalLM, seed: int) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()


def state_bytes(optimizer: torch.optim.Optimizer, skip=("step",)) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for k, t in s.items()
        if torch.is_tensor(t) and k not in skip
    )


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def config(request) -> LlamaConfig:
    return tiny_config(request.param)


def test_weights_and_adamw_state_match_a_real_torch_adamw(config):
    model = real_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    backward_once(model, 0)
    optimizer.step()
    adamw = rows(config)["AdamW"]
    assert adamw.weights == tensor_bytes(model.parameters())
    assert adamw.trainable_params == sum(p.numel() for p in model.parameters())
    assert adamw.gradients == tensor_bytes(p.grad for p in model.parameters())
    assert adamw.optimizer_state == state_bytes(optimizer)


def test_lora_matches_peft_adapters_as_llamafactory_creates_them(config):
    model = real_model(config)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, target_modules=TARGETS, lora_dropout=0.0))
    adapters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, foreach=False)
    backward_once(peft_model, 0)
    optimizer.step()
    lora = rows(config)["LoRA"]
    assert lora.trainable_params == sum(p.numel() for p in adapters)
    assert lora.weights == tensor_bytes(peft_model.parameters())
    assert lora.gradients == tensor_bytes(p.grad for p in adapters)
    assert lora.optimizer_state == state_bytes(optimizer)


def test_galore_state_matches_galore_adamw_and_fused_state_is_the_same(config):
    model = real_model(config)
    galore = hidden_linears(model)
    groups = [
        {"params": other_params(model, galore)},
        {"params": galore, "rank": RANK, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        optimizer = GaLoreAdamW(groups)
    backward_once(model, 0)
    optimizer.step()
    projectors = [s["projector"].ortho_matrix for s in optimizer.state.values() if "projector" in s]
    held = state_bytes(optimizer, skip=("step", "projector")) + tensor_bytes(projectors)
    expected = rows(config)
    assert expected["GaLore"].optimizer_state == held
    assert expected["GaLore"].gradients == tensor_bytes(p.grad for p in model.parameters())
    assert expected["GaLore-fused"].optimizer_state == held


def test_galore_fused_gradients_are_what_the_fused_optimizer_holds_between_refreshes(config):
    model = real_model(config)
    galore = hidden_linears(model)
    optimizer = FusedGaLoreAdamW(
        [
            {"params": other_params(model, galore)},
            {"params": galore, "rank": RANK, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
        ]
    )
    backward_once(model, 0)
    optimizer.step()  # step 0 refreshes the projectors; step 1 is a fused step
    optimizer.zero_grad()
    backward_once(model, 1)
    assert all(p.grad is None for p in galore)
    held = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    held += tensor_bytes(optimizer._pending.values())
    transient = 2 * max(p.numel() for p in galore)
    assert rows(config)["GaLore-fused"].gradients == held + transient


def test_mofasgd_state_is_the_factor_formula_and_what_the_real_optimizer_holds(config):
    model = real_model(config)
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    managed = [p for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings]
    others = other_params(model, managed)
    formula = sum(4 * ((p.shape[0] + p.shape[1]) * RANK + RANK) for p in managed)
    formula += 2 * 2 * sum(p.numel() for p in others)
    mofasgd = rows(config)["MoFaSGD"]
    assert mofasgd.optimizer_state == formula

    optimizer = MoFaSGD([{"params": managed, "mofasgd": True}, {"params": others, "mofasgd": False}], rank=RANK)
    backward_once(model, 0)
    optimizer.step()
    optimizer.zero_grad()
    after_step = state_bytes(optimizer)
    assert after_step == formula
    backward_once(model, 1)
    pending = state_bytes(optimizer) - after_step
    held = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None) + pending
    assert mofasgd.gradients == held + 2 * max(p.numel() for p in managed)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_estimate_matches_tensors_saved_by_a_real_forward(lora):
    shape = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3, "vocab_size": 256}
    config = tiny_config(tied=False, **shape, attn_implementation="sdpa")
    model = real_model(config)
    if lora:
        model = get_peft_model(model, LoraConfig(r=RANK, target_modules=TARGETS, lora_dropout=0.0))
    seq = 64
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    # The estimate also counts what is alive but not saved at the end of forward: bf16 logits and their fp32 copy.
    measured = sum(storages.values()) + seq * config.vocab_size * (2 + 4)
    in_features = (128,) * 6 + (352,) if lora else ()
    _, estimate = acc.activation_bytes(config, 1, seq, RANK if lora else 0, in_features)
    assert estimate == pytest.approx(measured, rel=0.002)


def test_fused_methods_drop_the_full_gradients_and_checkpointing_shrinks_activations():
    result = rows(tiny_config(False), seq_len=256)
    assert result["GaLore-fused"].gradients < result["GaLore"].gradients
    assert result["MoFaSGD"].gradients < result["AdamW"].gradients
    assert all(r.activations < r.activations_no_checkpointing for r in result.values())
    assert all(r.total == r.weights + r.gradients + r.optimizer_state + r.activations for r in result.values())


def test_main_writes_markdown_json_and_chart(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    results = acc.main(["--out", str(tmp_path), "--models", "Llama-3.2-1B", "--seq-len", "128"])
    markdown = (tmp_path / "memory_accounting.md").read_text()
    payload = json.loads((tmp_path / "memory_accounting.json").read_text())
    assert (tmp_path / "memory_accounting.png").stat().st_size > 0
    methods = payload["models"]["Llama-3.2-1B"]["methods"]
    assert [m["method"] for m in methods] == list(acc.METHODS)
    assert all(f"| {m} |" in markdown for m in acc.METHODS)
    config = LlamaConfig(**acc.LLAMA_SHAPES["Llama-3.2-1B"])
    h, i, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert methods[0]["trainable_params"] == v * h + layers * per_layer + h  # tied head, final norm
    assert methods[0] == results["Llama-3.2-1B"][0].__dict__
