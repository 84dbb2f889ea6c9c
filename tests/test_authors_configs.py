"""Done-when check of issue 12: configs using every key of the authors' Tulu 3 training YAMLs parse with the real
parser (bf16 GPU emulated), resolve their `tulu3_mixture_*` datasets and build their scheduler.

tests/fixtures/authors_configs/ holds our own configs, one per training YAML of the authors' configs/mfsgd and
configs/tulu3_mix (their coding config in both of its versions), in the same key combinations.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lf_helpers import REPO

CONFIGS = sorted((REPO / "tests" / "fixtures" / "authors_configs").glob("*.yaml"))
MIXTURE = REPO / "tests" / "fixtures" / "tulu3_mixture_sample.jsonl"

# Every key the authors' 16 Tulu 3 training YAMLs set (read from pmahdavi/llama-factory-mfsgd).
AUTHORS_KEYS = """
model_name_or_path trust_remote_code stage do_train finetuning_type deepspeed use_mfsgd learning_rate_mfsgd
learning_rate_adamw mfsgd_rank mfsgd_beta mfsgd_eta1 mfsgd_eta2 mfsgd_eps mfsgd_nesterov mfsgd_use_current_projection
mfsgd_use_ones_for_nonzero_s mfsgd_max_value use_galore galore_target galore_rank galore_update_interval galore_scale
galore_proj_type galore_fused galore_layerwise galore_lr_galore_params galore_lr_non_galore_params use_muon
muon_momentum muon_nesterov muon_ns_steps lora_rank lora_alpha lora_dropout lora_target additional_target
profile_memory_from_start profile_memory_stop_step profile_memory_max_entries dataset template cutoff_len max_steps
overwrite_cache preprocessing_num_workers dataloader_num_workers mix_strategy streaming output_dir logging_steps
save_strategy save_steps plot_loss overwrite_output_dir save_only_model report_to per_device_train_batch_size
gradient_accumulation_steps disable_gradient_checkpointing learning_rate weight_decay adam_beta1 adam_beta2
adam_epsilon num_train_epochs lr_scheduler_type warmup_ratio lr_scheduler_kwargs bf16 pure_bf16 ddp_timeout
resume_from_checkpoint eval_strategy val_size per_device_eval_batch_size eval_steps
""".split()


def _check(configs, dataset_dir: Path, **env):
    command = [sys.executable, "-m", "llamafactory_mfsgd.check_configs", *map(str, configs)]
    return subprocess.run(
        [*command, f"--dataset-dir={dataset_dir}"],
        cwd=REPO,  # `deepspeed: examples/deepspeed/ds_z3_config.json` is relative to the repository root
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.fixture()
def dataset_dir(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text((REPO / "data" / "dataset_info.json").read_text())
    return tmp_path / "data"


def test_our_copies_use_every_key_of_the_authors_configs():
    used = set().union(*(yaml.safe_load(path.read_text()) for path in CONFIGS))
    assert len(CONFIGS) == 17
    assert sorted(set(AUTHORS_KEYS) - used) == []


@pytest.mark.slow
def test_authors_equivalent_configs_parse_resolve_their_datasets_and_build_their_scheduler(dataset_dir):
    proc = _check(CONFIGS, dataset_dir, MFSGD_TULU3_MIXTURE=str(MIXTURE))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "17/17 configs parse" in proc.stdout
    assert proc.stdout.count("  OK    ") == 17
    assert "knowledge_recall.jsonl (3 rows)" in proc.stdout  # the authors' mapping: flan, sciriff, table_gpt
    assert 'warmup_stable_decay{"num_decay_steps": 400, "num_stable_steps": 600}' in proc.stdout
    assert "DeepSpeed ds_z3_config.json" in proc.stdout and "full/muon" in proc.stdout


@pytest.mark.slow
def test_the_checker_reports_configs_that_would_fail(dataset_dir, tmp_path):
    broken = yaml.safe_load(CONFIGS[0].read_text())
    bad_scheduler = tmp_path / "bad_scheduler.yaml"
    bad_scheduler.write_text(yaml.safe_dump({**broken, "lr_scheduler_kwargs": {"stable_ratio": 0.5}}))
    unprepared = tmp_path / "unprepared.yaml"
    unprepared.write_text(yaml.safe_dump(broken))
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MFSGD_TULU3_MIXTURE": ""}
    proc = _check([bad_scheduler, unprepared], dataset_dir, **env)
    assert proc.returncode == 1
    assert "0/2 configs parse" in proc.stdout
    assert "unexpected keyword argument 'stable_ratio'" in proc.stdout
    assert "python -m llamafactory_mfsgd.tulu3_mixture --dataset-dir" in proc.stdout
