"""The meta-device accounting agrees with what the real optimizers hold on a real tiny LLaMA in bf16."""

import json
import warnings

import pytest
import torch
from galore_fused import FusedGaLoreAdamW
from galore_torch import GaLoreAdamW
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import llama_memory_accounting as acc
from mofasgd import MoFaSGD

RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


# ------------------------------------------------------------------ FSDP2: per-GPU accounting

LLAMA_31 = ["Llama-3.1-8B", "Llama-3.1-70B"]
MOFASGD_ROWS = {"MoFaSGD": "all", "MoFaSGD+emb/head": "all,embed_tokens,lm_head"}


def fsdp2_rows(config: LlamaConfig, world: int, **kw) -> dict:
    return {r.method: r for r in acc.account_fsdp2(config, world_size=world, rank=RANK, **kw)}


def llama(name: str) -> LlamaConfig:
    return LlamaConfig(**acc.LLAMA_SHAPES[name])


@pytest.mark.parametrize("name", LLAMA_31)
def test_fsdp2_sharded_bytes_times_w_are_the_unsharded_bytes(name):
    config = llama(name)
    single, sharded = rows(config), fsdp2_rows(config, 8)
    for method in ("AdamW", "LoRA", "MoFaSGD", "MoFaSGD+emb/head"):
        assert sharded[method].weights * 8 == single[method].weights, method
    assert sharded["AdamW"].gradients * 8 == single["AdamW"].gradients
    assert sharded["AdamW"].optimizer_state * 8 == single["AdamW"].optimizer_state
    assert sharded["LoRA"].optimizer_state * 8 == single["LoRA"].optimizer_state
    assert sharded["LoRA"].gradients * 8 == single["LoRA"].gradients


def test_fsdp2_shards_are_torch_chunks_first_piece_when_rows_do_not_divide():
    config = tiny_config(False)  # vocab 320, hidden 64, kv 32, intermediate 160: none divides by 3 evenly
    model = acc.build_meta_model(config)
    world = 3
    first_chunks = sum(torch.chunk(p, world)[0].numel() for p in model.parameters())
    adamw = fsdp2_rows(config, world)["AdamW"]
    assert adamw.weights == 2 * first_chunks
    assert adamw.weights * world > 2 * sum(p.numel() for p in model.parameters())
    assert acc.shard_numel(torch.Size([7, 5]), 4) == 2 * 5
    assert acc.shard_numel(torch.Size([3]), 8) == 1  # trailing ranks hold nothing; the padded shard is one row


@pytest.mark.parametrize("name", LLAMA_31)
def test_fsdp2_mofasgd_state_is_the_sharded_factor_formula(name):
    from mofasgd import split_for_mofasgd

    config, world = llama(name), 8
    model = acc.build_meta_model(config)
    result = fsdp2_rows(config, world)
    for row, target in MOFASGD_ROWS.items():
        routing = split_for_mofasgd(model, target)
        managed = [p.shape for _, p in routing.mofasgd]
        rest = sum(p.numel() for _, p in routing.adamw)
        assert all(m % world == 0 for m, _ in managed) and rest % world == 0
        factors = sum((m // world * RANK + n * RANK + RANK) * 4 for m, n in managed)
        projections = sum((m // world + n) * RANK * 4 for m, n in managed)
        assert result[row].optimizer_state == factors + 2 * 2 * rest // world, row
        # the managed shards are consumed and the AdamW side's copied out of FSDP2's flat buffer: only the
        # AdamW-side shards and the projections are held, plus the final norm's copy where the root's buffer stays
        # (embeddings and LM head on AdamW keep it)
        norm_copy = 2 * config.hidden_size // world if row == "MoFaSGD" else 0
        assert result[row].gradients == 2 * rest // world + projections + norm_copy, row


def test_fsdp2_on_one_gpu_holds_what_the_single_gpu_accounting_holds():
    config = tiny_config(False)
    single, fsdp = rows(config), fsdp2_rows(config, 1)
    for method in ("AdamW", "LoRA", "MoFaSGD", "MoFaSGD+emb/head"):
        assert fsdp[method].weights == single[method].weights, method
        assert fsdp[method].optimizer_state == single[method].optimizer_state, method
        assert fsdp[method].activations == single[method].activations, method
    assert fsdp["AdamW"].gradients == single["AdamW"].gradients
    assert fsdp["LoRA"].gradients == single["LoRA"].gradients


@pytest.mark.parametrize("name", LLAMA_31)
def test_fsdp2_transient_is_root_plus_two_layers_of_params_and_grads(name):
    config = llama(name)
    h, i, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * h // config.num_attention_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    root, head_and_norm = 2 * v * h + h, v * h + h
    adamw = 2 * root + 2 * head_and_norm + 4 * 2 * layer  # root held, 2 layers' params + 2 layers' grads
    assert adamw > 2 * 2 * root  # the root's own reduce-scatter moment is smaller for these shapes
    adapters = RANK * (4 * h + 2 * (h + kv) + 2 * (h + i) + (i + h))  # q, o, k, v, gate, up, down
    lora = 2 * root + 2 * (2 * layer + 4 * adapters) + 2 * 4 * adapters
    result = fsdp2_rows(config, 8)
    assert layers > 2
    assert result["AdamW"].transient == adamw
    assert result["LoRA"].transient == lora
    managed_layer_shard = 2 * (layer - 2 * h) // 8  # autograd makes the same unsharded gradients, plus one
    assert result["MoFaSGD"].transient == adamw + managed_layer_shard  # layer's managed shards in the hooks


@pytest.mark.parametrize("name", LLAMA_31)
def test_fsdp2_per_gpu_totals_are_below_one_gpu_and_ordered(name):
    result = fsdp2_rows(llama(name), 8)
    assert all(r.total < r.single_gpu_total for r in result.values())
    assert all(
        r.total == r.weights + r.gradients + r.optimizer_state + r.transient + r.activations for r in result.values()
    )
    order = ["AdamW", "MoFaSGD", "MoFaSGD+emb/head", "LoRA"]
    totals = [result[m].total for m in order]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    assert result["MoFaSGD"].gradients < result["AdamW"].gradients / 5  # AdamW-side shards plus projections
    assert result["MoFaSGD"].optimizer_state < result["AdamW"].optimizer_state / 5


def test_main_writes_the_fsdp2_markdown_and_json(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    argv = ["--out", str(tmp_path), "--models", "Llama-3.2-1B", "--seq-len", "128"]
    acc.main([*argv, "--fsdp2-gpus", "4", "--fsdp2-models", "Llama-3.2-1B"])
    markdown = (tmp_path / "fsdp2_4gpu.md").read_text()
    payload = json.loads((tmp_path / "fsdp2_4gpu.json").read_text())
    assert all(f"| {m} |" in markdown for m in acc.FSDP2_METHODS)
    assert "Assumptions" in markdown and payload["settings"]["world_size"] == 4
    expected = acc.account_fsdp2(LlamaConfig(**acc.LLAMA_SHAPES["Llama-3.2-1B"]), 4, RANK, 1, 128)
    assert payload["models"]["Llama-3.2-1B"] == [r.__dict__ for r in expected]


# ------------------------------------------------------------------ FSDP2: the real thing, 2 gloo processes


def local_bytes(tensors) -> int:
    from mofasgd.sharding import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def local_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return local_bytes(t for s in optimizer.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "step")


def held_gradient_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the gradient shards still referenced (views of flat buffers)."""
    from mofasgd.sharding import local

    storages = {}
    for p in model.parameters():
        if p.grad is not None:
            storage = local(p.grad).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def fsdp2_worker(rank, world, port, out_dir):
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from llamafactory_mfsgd.gloo_exit import exit_spawned_worker
    from mofasgd import split_for_mofasgd

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for method in ("AdamW", "MoFaSGD"):
            model = real_model(tiny_config(False))
            for layer in model.model.layers:  # accelerate's LlamaDecoderLayer wrapping, then the root
                fully_shard(layer, reshard_after_forward=True)
            fully_shard(model, reshard_after_forward=True)
            if method == "AdamW":
                optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
            else:
                routing = split_for_mofasgd(model, "all")
                groups = [
                    {"params": [p for _, p in routing.mofasgd]},
                    {"params": [p for _, p in routing.adamw], "mofasgd": False},
                ]
                optimizer = MoFaSGD(groups, rank=RANK, lr=1e-3)
            backward_once(model, rank)
            optimizer.step()
            optimizer.zero_grad()
            state = local_state_bytes(optimizer)
            seen = []

            def probe(grad, model=model, seen=seen):  # in decoder-layer backward: is the root still unsharded?
                head = model.lm_head.weight
                seen.append(not isinstance(head, DTensor) and head.grad is not None)

            def hook(module, args, output, probe=probe):
                (output[0] if isinstance(output, tuple) else output).register_hook(probe)

            handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
            backward_once(model, 10 + rank)
            for handle in handles:
                handle.remove()
            result[method] = {
                "weights": local_bytes(model.parameters()),
                "state": state,
                "gradients": held_gradient_bytes(model) + local_state_bytes(optimizer) - state,
                "root_unsharded_in_layer_backward": seen,
            }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_spawned_worker()


@pytest.mark.distributed
def test_fsdp2_accounting_matches_what_two_gloo_processes_hold(tmp_path):
    """Weights, optimizer state and held gradients per rank: the accounting at W = 2, bytes for bytes.

    MoFaSGD's hooks drop the managed gradient shards and copy the norm weights' AdamW-side gradients out of the
    flat reduce-scatter buffer they share, so the held gradient bytes are the AdamW side's plus the projections.
    """
    import torch.multiprocessing as mp

    from llamafactory_mfsgd.launcher import free_port

    mp.spawn(fsdp2_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = fsdp2_rows(tiny_config(False), 2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for method, held in result.items():
            assert held["weights"] == expected[method].weights, method
            assert held["state"] == expected[method].optimizer_state, method
            assert held["gradients"] == expected[method].gradients, method
            assert held["root_unsharded_in_layer_backward"] == [True, True], method
    assert expected["MoFaSGD"].gradients < expected["AdamW"].gradients


@pytest.mark.parametrize("name", LLAMA_31)
def test_compact_adamw_side_rows_follow_the_factored_formula(name):
    """mfsgd_adamw_state rows: the AdamW-side matrices keep 4 (m + n) bytes of row/column means instead of the
    bf16 second moment (and, without momentum, no first moment); norms keep both bf16 moments."""
    from mofasgd import split_for_mofasgd

    config = llama(name)
    result = rows(config)
    side = [p.shape for _, p in split_for_mofasgd(acc.build_meta_model(config), "all").adamw]
    matrices = [s for s in side if len(s) == 2]
    assert matrices and all(s[0] >= 4096 for s in matrices)  # the embeddings and LM head
    second_moment = sum(2 * s.numel() for s in matrices)
    factored_means = sum(4 * (s[0] + s[1]) for s in matrices)
    full = result["MoFaSGD"].optimizer_state
    assert result["MoFaSGD+factored"].optimizer_state == full - second_moment + factored_means
    assert result["MoFaSGD+factored-no-momentum"].optimizer_state == full - 2 * second_moment + factored_means
    assert result["MoFaSGD+factored"].gradients == result["MoFaSGD"].gradients


@pytest.mark.parametrize("name", LLAMA_31)
def test_fused_adamw_side_rows_hold_one_gradient_at_a_time(name):
    """mfsgd_fused_adamw_side: besides the projections and the norms' gradients only the largest single matrix
    gradient is in flight (the LM head or embeddings here), so the compact no-momentum variant lands within 5% of
    LoRA at 8B and 70B."""
    config = llama(name)
    result = rows(config)
    h, v = config.hidden_size, config.vocab_size
    plain = result["MoFaSGD"]
    side_matrix_grads = 2 * (2 * v * h)  # the embeddings and LM head; the norms' gradients stay until step()
    largest_managed = 2 * h * config.intermediate_size
    fused = result["MoFaSGD+fused-side"]
    assert fused.gradients == plain.gradients - side_matrix_grads - largest_managed + 2 * v * h
    assert fused.optimizer_state == plain.optimizer_state
    compact = result["MoFaSGD+factored-no-momentum+fused-side"]
    assert compact.gradients == fused.gradients
    assert compact.optimizer_state == result["MoFaSGD+factored-no-momentum"].optimizer_state
    assert compact.total <= 1.05 * result["LoRA"].total < plain.total
