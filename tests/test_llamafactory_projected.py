"""The projected backward through llamafactory-cli (gradient checkpointing on, LLaMA-Factory's default): the same
model as the gradient-hook path, every matrix moved, and the start-up log says which path each matrix took."""

import pytest
import torch
from lf_helpers import assert_ok, log_history, run_cli, tiny_config, weights

pytestmark = pytest.mark.slow

CPU_BF16 = {"MFSGD_CPU_PURE_BF16": "1"}


def run(model, work, name, extra_env=None, **overrides):
    config = tiny_config(
        "tiny_sft_mfsgd.yaml",
        model,
        work / name,
        max_steps=5,
        save_steps=5,
        learning_rate_mfsgd=0.02,
        learning_rate_adamw=0.004,
        **overrides,
    )
    proc = run_cli(config, work, extra_env=extra_env)
    assert_ok(proc)
    return work / name, proc.stdout


@pytest.fixture(scope="module")
def fp32_runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("projected_fp32")
    return run(tiny_model, work, "projected"), run(tiny_model, work, "hook", mfsgd_projected_backward=False)


def test_start_up_log_names_each_matrix_path(fp32_runs):
    (_, projected_log), (_, hook_log) = fp32_runs
    assert "Projected backward: 14 of 14 MoFaSGD matrices" in projected_log
    assert "model.layers.*.mlp.down_proj.weight" in projected_log.split("Gradient paths:")[1]
    assert "projected_backward=True" in projected_log
    assert "Projected backward: 0 of 14" in hook_log and "hook (projected_backward=False)" in hook_log


def test_projected_run_equals_the_hook_run_and_moves_every_matrix(fp32_runs, tiny_model):
    (projected_out, _), (hook_out, _) = fp32_runs
    start, projected, hooked = weights(tiny_model), weights(projected_out), weights(hook_out)
    for key, value in hooked.items():
        torch.testing.assert_close(projected[key], value, atol=5e-5, rtol=5e-5, msg=key)
    matrices = [k for k, v in start.items() if v.dim() == 2 and "embed" not in k and "lm_head" not in k]
    assert len(matrices) == 14
    for key in matrices:
        moved, expected = (projected[key] - start[key]).norm(), (hooked[key] - start[key]).norm()
        assert moved > 0.9 * expected > 0, key
    logs_p, logs_h = log_history(projected_out), log_history(hook_out)
    assert [e["loss"] for e in logs_p] == pytest.approx([e["loss"] for e in logs_h], rel=1e-4)
    assert [e["grad_norm"] for e in logs_p] == pytest.approx([e["grad_norm"] for e in logs_h], rel=1e-4)


def test_pure_bf16_projected_run_tracks_the_hook_run(tiny_model_bf16, tmp_path):
    bf16 = dict(extra_env=CPU_BF16, pure_bf16=True)
    (projected_out, log), (hook_out, _) = (
        run(tiny_model_bf16, tmp_path, "projected", **bf16),
        run(tiny_model_bf16, tmp_path, "hook", mfsgd_projected_backward=False, **bf16),
    )
    assert "Projected backward: 14 of 14" in log
    start, projected, hooked = weights(tiny_model_bf16), weights(projected_out), weights(hook_out)
    matrices = [k for k, v in start.items() if v.dim() == 2 and "embed" not in k and "lm_head" not in k]
    for key in matrices:
        assert projected[key].dtype == torch.bfloat16
        step_p, step_h = (projected[key].float() - start[key].float()), (hooked[key].float() - start[key].float())
        assert step_p.norm() > 0 and (step_p - step_h).norm() < 0.2 * step_h.norm(), key
    logs_p, logs_h = log_history(projected_out), log_history(hook_out)
    assert [e["loss"] for e in logs_p] == pytest.approx([e["loss"] for e in logs_h], rel=2e-2)


def test_capturable_run_equals_the_eager_run(fp32_runs, tiny_model, tmp_path):
    """`mfsgd_capturable: true` reaches the optimizer (the start-up settings say so) and trains the same model."""
    (projected_out, _), _ = fp32_runs
    captured_out, log = run(tiny_model, tmp_path, "capturable", mfsgd_capturable=True)
    assert "capturable=True" in log
    start, eager, captured = weights(tiny_model), weights(projected_out), weights(captured_out)
    for key, value in eager.items():
        torch.testing.assert_close(captured[key], value, atol=1e-4, rtol=1e-4, msg=key)
    matrices = [k for k, v in start.items() if v.dim() == 2 and "embed" not in k and "lm_head" not in k]
    for key in matrices:
        moved, expected = (captured[key] - start[key]).norm(), (eager[key] - start[key]).norm()
        assert moved > 0.9 * expected > 0, key
    logs_c, logs_e = log_history(captured_out), log_history(projected_out)
    assert [e["loss"] for e in logs_c] == pytest.approx([e["loss"] for e in logs_e], rel=1e-4)
