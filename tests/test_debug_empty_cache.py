"""run.py's `--enable_mfsgd_debug_empty_cache` and the authors' `training_config.yaml` next to `run_config.yaml`."""

import subprocess
import sys

import pytest
import torch
import yaml
from lf_helpers import REPO, tiny_config

from llamafactory_mfsgd import cuda_cache
from llamafactory_mfsgd.launcher import prepare_run
from mofasgd import MoFaSGD


def test_run_directory_holds_the_resolved_config_under_both_names(tmp_path):
    config = tiny_config("tiny_sft_mfsgd.yaml", tmp_path / "model", tmp_path / "unused")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    resolved, resolved_config = prepare_run(str(path), 1, str(tmp_path / "runs"), ["mfsgd_rank=4"])
    authors = resolved.parent / "training_config.yaml"
    assert authors.read_text() == resolved.read_text()
    assert yaml.safe_load(authors.read_text())["mfsgd_rank"] == 4 == resolved_config["mfsgd_rank"]


def test_empty_cache_runs_after_each_managed_gradient_is_freed(monkeypatch):
    """With CUDA (faked here), empty_cache follows MoFaSGD's fused hook: the gradient is already gone."""
    monkeypatch.setenv(cuda_cache.ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.manual_seed(0)
    matrices = [torch.nn.Parameter(torch.randn(8, 6)) for _ in range(3)]
    bias = torch.nn.Parameter(torch.randn(6))
    optimizer = MoFaSGD([{"params": matrices}, {"params": [bias], "mofasgd": False}], rank=2)
    grads_seen = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: grads_seen.append([p.grad for p in matrices]))
    cuda_cache.release_cache_after_gradient_hooks(optimizer)

    sum(((m @ torch.ones(6)) ** 2).sum() for m in matrices).add((bias**2).sum()).backward()

    assert len(grads_seen) == len(matrices)  # once per managed matrix, never for the AdamW bias
    assert all(grad is None for grads in grads_seen for grad in grads)  # the hook freed it before


def test_empty_cache_is_not_hooked_without_the_variable_or_without_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    matrix = torch.nn.Parameter(torch.randn(8, 6))
    for env, cuda in (("", True), ("1", False)):
        monkeypatch.setenv(cuda_cache.ENV, env)
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        optimizer = MoFaSGD([{"params": [matrix]}], rank=2)
        cuda_cache.release_cache_after_gradient_hooks(optimizer)
        (matrix.sum() ** 2).backward()
        optimizer.remove_hooks()
    assert calls == []


@pytest.mark.slow
def test_run_py_accepts_the_authors_flag_and_says_once_it_is_a_no_op_on_cpu(tiny_model, tmp_path):
    config = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "unused", max_steps=2, save_steps=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "run.py", str(path), "--enable_mfsgd_debug_empty_cache", "--base_output_dir"]
    proc = subprocess.run(
        [*command, str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count(f"{cuda_cache.ENV}=1 has no effect here") == 1
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "training_config.yaml").read_text() == (run_dir / "run_config.yaml").read_text()
