"""What of `make gpu-check` runs without a GPU: the refusal line, the per-method configs and the report."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scripts import gpu_check

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.gpu_check"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert lines == ["gpu-check: no CUDA device on this machine, nothing run (it needs a GPU)."]


@pytest.mark.parametrize("method", gpu_check.METHODS + gpu_check.EXTRA_METHODS)
def test_every_method_runs_pure_bf16_with_the_memory_snapshot(method, tmp_path):
    config = gpu_check.run_config(method, tmp_path / "model", tmp_path, steps=10, rank=8)
    assert config["pure_bf16"] is True and config["profile_memory_from_start"] is True
    assert config["profile_memory_stop_step"] == 3 and config["max_steps"] == 10 and config["logging_steps"] == 5
    assert config["output_dir"] == str(tmp_path / method)
    assert config.get("use_mfsgd", False) == method.startswith("mofasgd")
    assert config.get("mfsgd_init") == {"mofasgd": "weight", "mofasgd_fast_start": "weight_randomized"}.get(method)
    assert config.get("galore_fused", False) == (method == "galore_fused")


def _step(step, seconds, optimizer_seconds, begin=None):
    begin = step * 1_000_000 if begin is None else begin
    return {
        "step": step,
        "begin_us": begin,
        "end_us": begin + int(seconds * 1e6),
        "optimizer_us": optimizer_seconds * 1e6,
    }


def test_report_rows_time_only_the_clean_steps():
    """The snapshot's steps and the one after it are left out, and logging steps are timed apart."""
    slow = [_step(1, 2.0, 0.5, begin=1_000_000), _step(2, 9.0, 0.4), _step(3, 9.0, 0.4), _step(4, 9.0, 0.4)]
    later = [_step(6, 1.0, 0.10), _step(7, 1.2, 0.10), _step(8, 0.8, 0.12), _step(9, 1.0, 0.10)]
    logging = [_step(5, 3.0, 0.7), _step(10, 3.0, 0.9)]
    memory = {"peak": {"total_bytes": 3 * 2**30, "breakdown": {"parameters": 2**30, "gradients": 2**29}}}
    row = gpu_check.summarize("mofasgd", 0, {"steps": slow + logging[:1] + later + logging[1:]}, memory)
    assert row["timed_steps"] == [6, 7, 8, 9]
    assert row["step_s"] == pytest.approx(1.0) and row["optimizer_share"] == pytest.approx(0.1)
    assert row["logging_optimizer_s"] == pytest.approx(0.8)
    assert row["first_step_s"] == pytest.approx(3.0)
    text = gpu_check.render_markdown([row], {"device": "GPU", "torch": "x"}, 10)
    assert "| mofasgd | 3.00 | 1.00 | 0.50 | n/a | n/a | 1.000 | 10.0 % | 0.800 | 3 |" in text


def test_short_runs_fall_back_to_the_steps_after_the_first():
    row = gpu_check.summarize("adamw", 0, {"steps": [_step(1, 5.0, 1.0), _step(2, 1.0, 0.2)]}, None)
    assert row["timed_steps"] == [2] and row["step_s"] == pytest.approx(1.0) and row["logging_optimizer_s"] is None


def test_a_failed_method_gets_its_row_and_the_others_still_run(tmp_path, monkeypatch):
    """One method's crash is reported in its row and in the exit code; the methods after it still run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "ensure_model", lambda name: tmp_path / "model")
    monkeypatch.setattr(gpu_check, "machine_description", lambda: {"device": "GPU", "torch": "x"})
    ran = []

    def fake_run(config, timeout):
        method = Path(config["output_dir"]).name
        ran.append(method)
        if method == "lora":
            raise RuntimeError("training failed (exit 1); log x:\nTraceback ...\nValueError: bad | thing")
        return SimpleNamespace(timing={"steps": [_step(1, 1.0, 0.01), _step(2, 1.0, 0.01)]}, memory_summary=None)

    monkeypatch.setattr(gpu_check, "run_training", fake_run)
    code = gpu_check.main(["--methods", "lora", "adamw", "--out", str(tmp_path / "out"), "--timeout", "5"])
    assert code == 1 and ran == ["lora", "adamw"]
    text = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| lora | failed: ValueError: bad / thing |" in text
    assert "| adamw | n/a |" in text


def test_the_8b_check_is_llama_3_1_8b_shaped_at_8k_tokens_a_step(tmp_path):
    """`make gpu-check-8b`: LLaMA-3.1-8B's decoder matrices, 8192 packed tokens a step, and AdamW's pure-bf16 state
    small enough for one 80 GB GPU (counted on the meta device: nothing is allocated)."""
    import transformers

    from benchmarks.llama_layer import LLAMA_8B, layer_matrix_shapes

    model = gpu_check.SIZES["8b"]
    config = gpu_check.run_config("mofasgd", tmp_path / "model", tmp_path, steps=8, rank=8, model=model)
    assert config["cutoff_len"] == 8192 and config["packing"] is True and config["pure_bf16"] is True
    flags = dict(zip(model.build_flags()[::2], model.build_flags()[1::2]))
    assert flags["--max-positions"] == "8192" and flags["--dtype"] == "bfloat16"
    llama = transformers.LlamaConfig(
        vocab_size=int(flags["--vocab"]),
        hidden_size=int(flags["--hidden"]),
        intermediate_size=int(flags["--intermediate"]),
        num_hidden_layers=int(flags["--layers"]),
        num_attention_heads=int(flags["--heads"]),
        num_key_value_heads=int(flags["--kv-heads"]),
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        built = transformers.LlamaForCausalLM(llama)
    layer = {
        name.split(".")[-2]: tuple(p.shape) for name, p in built.model.layers[0].named_parameters() if p.dim() == 2
    }
    assert sorted(layer.values()) == sorted(layer_matrix_shapes(**LLAMA_8B))
    assert len(built.model.layers) == 32
    params = sum(p.numel() for p in built.parameters())
    assert 7.0e9 < params < 7.5e9
    assert 8 * params < 60e9  # bf16 weights + gradients + two AdamW moments


def test_the_1b_report_keeps_its_name_and_the_8b_one_gets_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "machine_description", lambda: {"device": "GPU", "torch": "x"})
    row = gpu_check.summarize("adamw", 0, {"steps": [_step(1, 5.0, 1.0), _step(2, 1.0, 0.2)]}, None)
    for size, name in (("1b", "gpu_check.md"), ("8b", "gpu_check_8b.md")):
        gpu_check.write_report([row], 2, tmp_path, None, gpu_check.SIZES[size])
        text = (tmp_path / name).read_text()
        assert gpu_check.SIZES[size].name in text
    assert "8192 tokens (packed)" in (tmp_path / "gpu_check_8b.md").read_text()
    assert "up to 1024 tokens" in (tmp_path / "gpu_check.md").read_text()
