"""`mfsgd_fused_adamw_side` and `mfsgd_adamw_state` through llamafactory-cli on the tiny model."""

import pytest
import torch
from lf_helpers import assert_ok, log_history, run_cli, tiny_config, weights

pytestmark = pytest.mark.slow


def test_fused_adamw_side_trains_like_the_step_time_update_through_llamafactory(tiny_model, tmp_path):
    """Gradient accumulation 2 and clipping off: the hooked AdamW side (at the Trainer's sync step) gives the
    same weights and logged loss / grad norm as the step-time one, and the log says it is on."""
    common = {"max_grad_norm": 100.0, "max_steps": 4, "save_steps": 4}
    plain = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "plain", **common)
    fused = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "fused", mfsgd_fused_adamw_side=True, **common)
    assert_ok(run_cli(plain, tmp_path))
    proc = run_cli(fused, tmp_path)
    assert_ok(proc)
    assert "fused_adamw_side=True" in proc.stdout
    start, want, got = weights(tiny_model), weights(tmp_path / "plain"), weights(tmp_path / "fused")
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=2e-5, rtol=1e-4, msg=key)
    assert not torch.equal(got["lm_head.weight"], start["lm_head.weight"])
    for a, b in zip(log_history(tmp_path / "fused"), log_history(tmp_path / "plain"), strict=True):
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-4)


def test_factored_adamw_state_from_yaml_keeps_row_and_column_means(tiny_model, tmp_path):
    config = tiny_config(
        "tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "out", mfsgd_adamw_state="factored_no_momentum", max_steps=2
    )
    config["save_steps"] = 2
    proc = run_cli(config, tmp_path)
    assert_ok(proc)
    assert "adamw_state=factored_no_momentum" in proc.stdout
    state = torch.load(tmp_path / "out" / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    factored = [s for s in state.values() if "exp_avg_sq_row" in s]
    assert len(factored) == 2  # the embeddings and the LM head (untied); norms keep AdamW's moments
    assert all("exp_avg" not in s and s["exp_avg_sq_row"].dtype == torch.float32 for s in factored)


@pytest.mark.distributed
def test_compact_adamw_side_on_two_ddp_processes_equals_one_process(tiny_model, tmp_path):
    """The shipped 8B MoFaSGD keys (factored_no_momentum + fused AdamW side) under DDP: the embeddings and LM head
    are left out of DDP and averaged in their hooks, the norms stay with DDP; same global batch as one process."""
    keys = {"mfsgd_adamw_state": "factored_no_momentum", "mfsgd_fused_adamw_side": True, "max_steps": 4}
    one = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "one", per_device_train_batch_size=4, **keys)
    two = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "two", per_device_train_batch_size=2, **keys)
    assert_ok(run_cli(one, tmp_path))
    proc = run_cli(two, tmp_path, extra_env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert_ok(proc)
    assert "data_parallel=True" in proc.stdout and "fused_adamw_side=True" in proc.stdout
    start, want, got = weights(tiny_model), weights(tmp_path / "one"), weights(tmp_path / "two")
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=2e-5, rtol=1e-4, msg=key)
    assert not torch.equal(got["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    for a, b in zip(log_history(tmp_path / "two"), log_history(tmp_path / "one"), strict=True):
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-4)
