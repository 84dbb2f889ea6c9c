"""Pure-bf16 MoFaSGD through llamafactory-cli on a CPU (MFSGD_CPU_PURE_BF16=1): weights stay bf16 and move,
stochastic rounding keeps the update that round-to-nearest loses, and the diagnostics reach the Trainer log."""

import pytest
import torch
from lf_helpers import assert_ok, log_history, run_cli, tiny_config, weights

pytestmark = pytest.mark.slow

CPU_BF16 = {"MFSGD_CPU_PURE_BF16": "1"}


def run(tiny_model, work, name, extra_env=None, **overrides):
    config = tiny_config(
        "tiny_sft_mfsgd.yaml",
        tiny_model,
        work / name,
        max_steps=4,
        save_steps=4,
        logging_steps=2,
        learning_rate_mfsgd=1e-5,
        learning_rate_adamw=1e-5,
        lr_scheduler_type="constant",
        **overrides,
    )
    proc = run_cli(config, work, extra_env=extra_env)
    assert_ok(proc)
    return work / name, proc.stdout


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_model_bf16, tmp_path_factory):
    work = tmp_path_factory.mktemp("bf16")
    bf16 = dict(extra_env=CPU_BF16, pure_bf16=True)
    return {
        "fp32": run(tiny_model, work, "fp32"),
        "sr": run(tiny_model_bf16, work, "sr", **bf16),
        "nearest": run(tiny_model_bf16, work, "nearest", **bf16, mfsgd_stochastic_rounding=False),
        "compiled": run(tiny_model_bf16, work, "compiled", **bf16, mfsgd_rounding_kernel="compiled"),
    }


def diagnostics(out):
    return [e for e in log_history(out) if "mfsgd/applied_fraction" in e]


def test_diagnostics_are_logged_every_logging_step(runs):
    entries = diagnostics(runs["fp32"][0])
    assert [e["step"] for e in entries] == [2, 4]
    for e in entries:
        assert e["mfsgd/applied_fraction"] == pytest.approx(1.0, abs=1e-3)
        assert 0 < e["mfsgd/alive_fraction"] <= 1 and e["mfsgd/s_max"] >= e["mfsgd/s_median"] > 0
        assert 0 < e["mfsgd/update_rms_ratio"] < 1e-2


def test_pure_bf16_weights_stay_bf16_and_every_matrix_moves_with_stochastic_rounding(runs, tiny_model_bf16):
    out, stdout = runs["sr"]
    assert "stochastic_rounding=None" in stdout  # the default: on for bf16 weights
    start, final = weights(tiny_model_bf16), weights(out)
    matrices = [k for k, v in final.items() if v.dim() == 2 and "embed" not in k and "lm_head" not in k]
    assert matrices and all(final[k].dtype == torch.bfloat16 for k in matrices)
    moved = [k for k in matrices if not torch.equal(final[k].float(), start[k].float())]
    assert moved == matrices
    for e in diagnostics(out):
        assert 0.8 < e["mfsgd/applied_fraction"] < 1.2


def test_round_to_nearest_loses_the_small_updates_that_stochastic_rounding_keeps(runs):
    nearest = [e["mfsgd/applied_fraction"] for e in diagnostics(runs["nearest"][0])]
    kept = [e["mfsgd/applied_fraction"] for e in diagnostics(runs["sr"][0])]
    assert max(nearest) < 0.2 < min(kept)


def test_the_compiled_rounding_kernel_trains_every_bf16_tensor_and_keeps_the_update(runs, tiny_model_bf16):
    """`mfsgd_rounding_kernel: compiled` through llamafactory-cli: the matrices (fused update) and the AdamW side's
    matrices (embeddings, head: the fused AdamW step) all move, stay bf16, and keep the fp32 update in expectation."""
    out, stdout = runs["compiled"]
    assert "rounding_kernel=compiled" in stdout and "rounding_kernel=auto" in runs["sr"][1]
    start, final = weights(tiny_model_bf16), weights(out)
    assert all(v.dtype == torch.bfloat16 for v in final.values())
    matrices = [k for k, v in final.items() if v.dim() == 2]  # the norms' 1.0 entries move by 1e-5 in 2**-7 steps
    assert any("embed" in k for k in matrices) and any("lm_head" in k for k in matrices)  # the AdamW side too
    moved = [k for k in matrices if not torch.equal(final[k].float(), start[k].float())]
    assert moved == matrices
    for e in diagnostics(out):
        assert 0.8 < e["mfsgd/applied_fraction"] < 1.2
    sr = weights(runs["sr"][0])
    assert any(not torch.equal(final[k], sr[k]) for k in final)  # other bits than the eager kernel's
