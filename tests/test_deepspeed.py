"""DeepSpeed: the shipped ZeRO configs train the AdamW and LoRA baselines on 2 CPU processes; MoFaSGD refuses them."""

import json

import pytest
import torch
from lf_helpers import REPO, assert_ok, log_history, run_cli, tiny_config
from llamafactory.hparams import get_train_args
from safetensors.torch import load_file

DS_DIR = REPO / "examples" / "deepspeed"
TWO_PROCESSES = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}


@pytest.mark.parametrize("name", ["ds_z0", "ds_z2", "ds_z2_offload", "ds_z3", "ds_z3_offload"])
def test_shipped_deepspeed_configs_are_the_zero_stage_their_name_says(name):
    config = json.loads((DS_DIR / f"{name}_config.json").read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == int(name[4])
    assert ("offload_optimizer" in zero) == name.endswith("offload")
    # HF fills "auto" from the training arguments, so batch sizes and precision follow the YAML
    assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"


def test_mfsgd_with_the_shipped_zero3_config_is_refused_pointing_to_fsdp2_and_ddp(tmp_path):
    config = tiny_config("tiny_sft_mfsgd.yaml", tmp_path / "no-model", tmp_path / "out")
    with pytest.raises(ValueError, match="flattened 1-D shards.*FSDP2.*plain DDP"):
        get_train_args({**config, "deepspeed": "examples/deepspeed/ds_z3_config.json"})


@pytest.mark.slow
@pytest.mark.distributed
def test_adamw_and_lora_train_under_zero3_on_two_cpu_processes(tiny_model, tmp_path):
    """The authors' relative path `examples/deepspeed/ds_z3_config.json` works from the repository root.

    ZeRO-3 partitions parameters, gradients and AdamW state over the 2 processes; the AdamW run must follow the
    same losses as plain 2-process DDP (same data, same global batch), the LoRA run must train its adapters.
    """
    ds = {"deepspeed": "examples/deepspeed/ds_z3_config.json", "per_device_train_batch_size": 2}
    zero3 = tiny_config("tiny_sft_adamw.yaml", tiny_model, tmp_path / "adamw_z3", **ds)
    ddp = tiny_config("tiny_sft_adamw.yaml", tiny_model, tmp_path / "adamw_ddp", per_device_train_batch_size=2)
    proc = run_cli(zero3, tmp_path, extra_env=TWO_PROCESSES)
    assert_ok(proc)
    assert "Detected DeepSpeed ZeRO-3" in proc.stdout and "world size: 2" in proc.stdout
    assert (tmp_path / "adamw_z3" / "checkpoint-6" / "global_step6").is_dir()  # a DeepSpeed checkpoint
    assert_ok(run_cli(ddp, tmp_path, extra_env=TWO_PROCESSES))
    losses = [entry["loss"] for entry in log_history(tmp_path / "adamw_z3")]
    assert losses == pytest.approx([entry["loss"] for entry in log_history(tmp_path / "adamw_ddp")], rel=1e-3)
    assert losses[-1] < losses[0]

    lora = tiny_config("tiny_sft_lora.yaml", tiny_model, tmp_path / "lora_z3", **ds)
    proc = run_cli(lora, tmp_path, extra_env=TWO_PROCESSES)
    assert_ok(proc)
    assert "Detected DeepSpeed ZeRO-3" in proc.stdout
    adapter = load_file(str(tmp_path / "lora_z3" / "adapter_model.safetensors"))
    lora_b = [value for key, value in adapter.items() if "lora_B" in key]
    assert lora_b and all(torch.count_nonzero(value) > 0 for value in lora_b)  # B starts at zero: it trained
