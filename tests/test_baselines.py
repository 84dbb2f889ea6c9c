"""The authors' baseline keys: GaLore's two learning rates and Muon's momentum/Nesterov/NS steps change the run."""

import llamafactory.train.trainer_utils as trainer_utils
import pytest
import torch
from lf_helpers import assert_ok, log_history, run_cli, tiny_config
from llamafactory.hparams import get_train_args
from transformers import AutoModelForCausalLM

MUON = {"use_muon": True}
GALORE = {"use_galore": True, "galore_target": "all", "galore_rank": 4, "optim": "adamw_torch"}


@pytest.fixture()
def base(tmp_path):
    return tiny_config("tiny_sft_adamw.yaml", tmp_path / "no-model-needed", tmp_path / "out", weight_decay=0.0)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"use_fisher": True}, "`use_fisher: true` \\(the authors' Fisher-information pipeline\\) is out of scope"),
        ({"galore_lr_galore_params": 1e-3}, "needs `use_galore: true`"),
        ({"galore_lr_non_galore_params": 1e-3}, "needs `use_galore: true`"),
        ({**GALORE, "galore_lr_galore_params": -1.0}, "galore_lr_galore_params: -1.0"),
        ({"muon_momentum": 0.5}, "needs `use_muon: true`"),
        ({"muon_nesterov": False}, "needs `use_muon: true`"),
        ({"muon_ns_steps": 3}, "needs `use_muon: true`"),
        ({**MUON, "muon_momentum": 1.0}, "muon_momentum: 1.0"),
        ({**MUON, "muon_ns_steps": 0}, "muon_ns_steps: 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_baseline_keys_fail_at_parse_time(base, change, message):
    with pytest.raises(ValueError, match=message):
        get_train_args({**base, **change})


def _trained(tiny_model, config: dict, steps: int) -> dict[str, torch.Tensor]:
    """Weights after `steps` optimizer steps on one fixed batch, with the optimizer LLaMA-Factory builds (patched)."""
    _, _, training_args, finetuning_args, _ = get_train_args(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    optimizer = trainer_utils.create_custom_optimizer(model, training_args, finetuning_args)
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(a: dict, b: dict, names: list[str]) -> list[bool]:
    return [not torch.equal(a[name], b[name]) for name in names]


MATRIX, EMBED = "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"


def test_galore_learning_rates_reach_their_own_groups(tiny_model, base):
    config = {**base, **GALORE}
    plain = _trained(tiny_model, config, steps=1)
    same = _trained(tiny_model, {**config, "galore_lr_galore_params": config["learning_rate"]}, steps=1)
    matrices = _trained(tiny_model, {**config, "galore_lr_galore_params": 3e-2}, steps=1)
    others = _trained(tiny_model, {**config, "galore_lr_non_galore_params": 3e-2}, steps=1)
    assert _changed(plain, same, [MATRIX, EMBED]) == [False, False]
    assert _changed(plain, matrices, [MATRIX, EMBED]) == [True, False]
    assert _changed(plain, others, [MATRIX, EMBED]) == [False, True]


@pytest.mark.parametrize(
    "key,value", [("muon_momentum", 0.5), ("muon_nesterov", False), ("muon_ns_steps", 2)], ids=lambda v: str(v)
)
def test_each_muon_key_changes_the_muon_update(tiny_model, base, key, value):
    config = {**base, **MUON}
    plain = _trained(tiny_model, config, steps=2)
    changed = _trained(tiny_model, {**config, key: value}, steps=2)
    assert _changed(plain, changed, [MATRIX]) == [True]


def test_muon_keys_at_llamafactorys_values_leave_the_run_unchanged(tiny_model, base):
    config = {**base, **MUON}
    explicit = {"muon_momentum": 0.95, "muon_nesterov": True, "muon_ns_steps": 5}
    plain, same = _trained(tiny_model, config, steps=2), _trained(tiny_model, {**config, **explicit}, steps=2)
    assert all(torch.equal(plain[name], same[name]) for name in plain)


@pytest.mark.slow
def test_authors_galore_and_muon_keys_train_through_llamafactory_cli(tiny_model, tmp_path):
    """Scheduler and logs see the configured rates: HF logs the first group's (non-GaLore) learning rate."""
    common = dict(max_steps=3, save_steps=3, warmup_ratio=0.0, lr_scheduler_type="constant")
    galore = tiny_config(
        "tiny_sft_galore.yaml",
        tiny_model,
        tmp_path / "galore",
        galore_lr_galore_params=2e-2,
        galore_lr_non_galore_params=5e-3,
        **common,
    )
    proc = run_cli(galore, tmp_path)
    assert_ok(proc)
    assert "GaLore learning rates: projected matrices 0.02, other parameters 0.005" in proc.stdout
    assert [entry["learning_rate"] for entry in log_history(tmp_path / "galore")] == [5e-3] * 3

    muon = tiny_config(
        "tiny_sft_adamw.yaml",
        tiny_model,
        tmp_path / "muon",
        use_muon=True,
        muon_momentum=0.0,
        muon_nesterov=False,
        muon_ns_steps=5,
        **common,
    )
    proc = run_cli(muon, tmp_path)
    assert_ok(proc)
    assert "Muon hyperparameters from the config: {'momentum': 0.0, 'nesterov': False, 'ns_steps': 5}" in proc.stdout
