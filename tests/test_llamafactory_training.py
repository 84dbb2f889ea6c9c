"""End to end through the real LLaMA-Factory pipeline on CPU: MoFaSGD trains, logs, clips, saves and resumes."""

import pytest
import torch
import yaml
from lf_helpers import assert_ok, log_history, run_cli, run_py, tiny_config, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mfsgd_run(tiny_model, tmp_path_factory):
    """One 6-step MoFaSGD run with checkpoints at steps 3 and 6, shared by several tests."""
    work = tmp_path_factory.mktemp("mfsgd_run")
    config = tiny_config(
        "tiny_sft_mfsgd.yaml", tiny_model, work / "out", learning_rate_mfsgd=0.02, learning_rate_adamw=0.004
    )
    proc = run_cli(config, work)
    assert_ok(proc)
    return config, work / "out", proc.stdout


def test_cli_trains_with_mofasgd_and_checkpoint_holds_factors(mfsgd_run, tiny_model):
    config, out, stdout = mfsgd_run
    assert stdout.count("Using MoFaSGD") == 1
    assert "model.layers.*.mlp.down_proj.weight" in stdout
    state = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)
    factored = [s for s in state["state"].values() if "U" in s]
    adamw = [s for s in state["state"].values() if "exp_avg" in s]
    assert len(factored) == 7 * 2  # q, k, v, o, gate, up, down in each of the 2 layers
    assert len(adamw) == 2 * 2 + 1 + 2  # 2 norms per layer, final norm, embeddings, LM head
    for s in factored:
        assert s["U"].shape[1] == s["V"].shape[1] == s["S"].shape[0] == config["mfsgd_rank"]
        assert s["U"].dtype == torch.float32 and int(s["step"]) == 6


def test_two_learning_rates_and_one_scheduler_drive_both_groups(mfsgd_run):
    config, out, _ = mfsgd_run
    groups = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)["param_groups"]
    mfsgd = [g for g in groups if g["mofasgd"]]
    adamw = [g for g in groups if not g["mofasgd"]]
    assert [g["initial_lr"] for g in mfsgd] == [config["learning_rate_mfsgd"]]
    assert {g["initial_lr"] for g in adamw} == {config["learning_rate_adamw"]}
    factors = {round(g["lr"] / g["initial_lr"], 9) for g in groups}
    assert len(factors) == 1 and 0 < factors.pop() < 1  # cosine schedule, same factor for every group


def test_logged_grad_norm_includes_mofasgd_matrices_and_loss_falls(mfsgd_run):
    _, out, _ = mfsgd_run
    history = log_history(out)
    assert len(history) == 6
    assert all(entry["grad_norm"] > 0 for entry in history)
    assert history[-1]["loss"] < history[0]["loss"]


def test_resume_from_checkpoint_continues_exactly(mfsgd_run, tmp_path):
    config, out, _ = mfsgd_run
    resumed_config = dict(
        config, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(out / "checkpoint-3")
    )
    assert_ok(run_cli(resumed_config, tmp_path))
    full, resumed = weights(out), weights(tmp_path / "resumed")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=1e-5)
    tail = [e["loss"] for e in log_history(out)][3:]
    assert [e["loss"] for e in log_history(tmp_path / "resumed")][-3:] == pytest.approx(tail, rel=1e-5)


def test_run_py_names_the_run_writes_resolved_config_and_trains(tiny_model, tmp_path):
    config = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "ignored", max_steps=2, save_steps=2)
    proc = run_py(config, tmp_path, ngpus=1, base_output_dir=tmp_path / "runs")
    assert_ok(proc)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith(f"{tiny_model.name}_tulu3_demo_mfsgd-r8_bs8_")
    resolved = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    assert resolved["output_dir"] == str(run_dir) and resolved["use_mfsgd"] is True
    states = torch.load(run_dir / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"].values()
    assert any("U" in s for s in states)
    assert proc.stdout.count("Using MoFaSGD") == 1
