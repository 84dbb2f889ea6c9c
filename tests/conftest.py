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
}.items():
    os.environ.setdefault(_key, _value)
