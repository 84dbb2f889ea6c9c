"""Shared test setup: everything offline, caches in a temporary directory, nothing in $HOME."""

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="mfsgd-tests-")
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": os.path.join(_CACHE, "hf"),
    "MPLCONFIGDIR": os.path.join(_CACHE, "mpl"),
    "MPLBACKEND": "Agg",
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_EXTENSIONS_DIR": os.path.join(_CACHE, "torch_extensions"),  # DeepSpeed's CPU ops build here, once
}.items():
    os.environ.setdefault(_key, _value)


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from scripts.build_tiny_llama import ensure_built  # noqa: E402


def _build_tiny_model(tmp_path_factory, name: str, *extra: str) -> Path:
    return ensure_built(tmp_path_factory.mktemp("models") / name, *extra, quiet=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny LLaMA + tokenizer, built once per session by the project's own script (offline, deterministic)."""
    return _build_tiny_model(tmp_path_factory, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_bf16(tmp_path_factory) -> Path:
    """The same tiny LLaMA stored in bf16 (as LLaMA-3.1 is on the hub), so `pure_bf16` trains bf16 weights."""
    return _build_tiny_model(tmp_path_factory, "tiny-llama-bf16", "--dtype", "bfloat16")


@pytest.fixture(params=["householder", "cholesky_qr2"])
def both_panel_qr_forms(request, monkeypatch):
    """Run a test with each orthonormalisation of unsharded panels: CPU's Householder, and CUDA's CholeskyQR2."""
    import mofasgd.factor_math as fm

    devices = {"cuda"} | ({"cpu"} if request.param == "cholesky_qr2" else set())
    monkeypatch.setattr(fm, "CHOLESKY_QR_DEVICES", devices)
    return request.param
