"""`llamafactory-cli train` with FSDP2 keys: MoFaSGD on 2 CPU processes equals 1 process, and resumes exactly.

accelerate applies FSDP on GPUs only; MFSGD_CPU_FSDP2=1 makes it shard these CPU processes with FSDP2 (gloo), so
the real Trainer/accelerate path runs: fully_shard, the optimizer's parameters swapped for DTensors, sharded
(DCP) checkpoints of the model and of MoFaSGD's state.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lf_helpers import assert_ok, env, log_history, run_cli, tiny_config, weights
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from llamafactory_mfsgd.launcher import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

FSDP2 = {
    "fsdp": "full_shard auto_wrap",
    "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    "per_device_train_batch_size": 2,
}
TWO_FSDP2_PROCESSES = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MFSGD_CPU_FSDP2": "1"}
COMMON = {"max_grad_norm": 1.0, "mfsgd_nesterov": True}  # grad norms here are 2-3: clipping is active
LOGGED = ("loss", "grad_norm", "mfsgd/s_max", "mfsgd/s_median", "mfsgd/update_rms_ratio")


def sharded_weights(checkpoint, tmp_path):
    """The model weights of a sharded FSDP2 checkpoint, gathered into one state dict."""
    merged = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint / "pytorch_model_fsdp_0"), str(merged))
    return torch.load(merged, weights_only=True)["model"]


def logged(run_dir):
    return [[entry[key] for key in LOGGED] for entry in log_history(run_dir)]


def test_fsdp2_two_processes_equal_one_process_and_resume_exactly(tiny_model, tmp_path):
    single = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "single", per_device_train_batch_size=4)
    assert_ok(run_cli({**single, **COMMON}, tmp_path))
    sharded = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "fsdp2", **FSDP2, **COMMON)
    proc = run_cli(sharded, tmp_path, extra_env=TWO_FSDP2_PROCESSES)
    assert_ok(proc)
    assert "world size: 2" in proc.stdout and "data_parallel=False" in proc.stdout
    assert (tmp_path / "fsdp2" / "checkpoint-3" / "optimizer_0").is_dir()  # MoFaSGD's state went through DCP
    # the single process ran the projected backward; FSDP2 keeps the hook path and says so
    assert "Projected backward: 0 of 14" in proc.stdout and "hook (FSDP2 shards the weight" in proc.stdout

    one = logged(tmp_path / "single")
    assert len(one) == 6 and max(row[1] for row in one) > COMMON["max_grad_norm"]
    for got, want in zip(logged(tmp_path / "fsdp2"), one):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
    start = weights(tiny_model)
    expected = weights(tmp_path / "single")
    final = sharded_weights(tmp_path / "fsdp2" / "checkpoint-6", tmp_path)
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, atol=2e-5, rtol=1e-4, msg=key)
        if key.endswith("proj.weight"):  # every MoFaSGD matrix moved, by as much as in the 1-process run
            moved, reference = (final[key] - start[key]).norm(), (value - start[key]).norm()
            assert reference > 0 and moved == pytest.approx(float(reference), rel=1e-3), key

    resumed = dict(
        sharded, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(tmp_path / "fsdp2" / "checkpoint-3")
    )
    assert_ok(run_cli(resumed, tmp_path, extra_env=TWO_FSDP2_PROCESSES))
    for got, want in zip(logged(tmp_path / "resumed")[-3:], logged(tmp_path / "fsdp2")[-3:], strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    for key, value in sharded_weights(tmp_path / "resumed" / "checkpoint-6", tmp_path).items():
        torch.testing.assert_close(value, final[key], atol=1e-6, rtol=1e-5, msg=key)


def test_pure_bf16_under_fsdp2_moves_every_matrix_as_one_process_does(tiny_model_bf16, tmp_path):
    """pure_bf16 + FSDP2 (2 CPU processes): weights stay bf16 row shards, every managed matrix moves, stochastic
    rounding keeps the intended step (applied_fraction ~ 1, the diagnostics summed over shards), and each matrix
    moves as far as in the 1-process bf16 run (the rounding noise differs, so not bit for bit; at this learning
    rate the steps are well above a bf16 ulp, so the noise does not dominate the distance moved)."""
    bf16 = {"pure_bf16": True, "max_steps": 4, "learning_rate_mfsgd": 1e-3, "learning_rate_adamw": 1e-3}
    bf16 |= {"lr_scheduler_type": "constant", "logging_steps": 2, "save_steps": 4}
    one = tiny_config("tiny_sft_mfsgd.yaml", tiny_model_bf16, tmp_path / "one", per_device_train_batch_size=4, **bf16)
    assert_ok(run_cli(one, tmp_path, extra_env={"MFSGD_CPU_PURE_BF16": "1"}))
    two = tiny_config("tiny_sft_mfsgd.yaml", tiny_model_bf16, tmp_path / "two", **FSDP2, **bf16)
    assert_ok(run_cli(two, tmp_path, extra_env={**TWO_FSDP2_PROCESSES, "MFSGD_CPU_PURE_BF16": "1"}))
    for entry in log_history(tmp_path / "two")[1:]:  # the first step has lr 0 in the log's warm-up-free schedule
        assert 0.8 < entry["mfsgd/applied_fraction"] < 1.2
    start, reference = weights(tiny_model_bf16), weights(tmp_path / "one")
    final = sharded_weights(tmp_path / "two" / "checkpoint-4", tmp_path)
    matrices = [k for k in reference if k.endswith("proj.weight")]
    assert matrices and all(final[k].dtype == torch.bfloat16 for k in matrices)
    for key in matrices:
        moved = (final[key].float() - start[key].float()).norm()
        expected = (reference[key].float() - start[key].float()).norm()
        assert expected > 0 and 0.9 < float(moved / expected) < 1.1, key


@pytest.fixture(scope="module")
def three_fsdp2_steps(tiny_model, tmp_path_factory):
    """A 2-process FSDP2 MoFaSGD run of 3 steps, checkpointed (sharded) at its last step."""
    workdir = tmp_path_factory.mktemp("fsdp2-output")
    config = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, workdir / "run", **FSDP2, max_steps=3, save_steps=3)
    assert_ok(run_cli(config, workdir, extra_env=TWO_FSDP2_PROCESSES))
    return config, workdir


def test_fsdp2_run_leaves_a_loadable_hf_model_with_config_and_tokenizer(three_fsdp2_steps, tiny_model, tmp_path):
    """Issue 22 item 1: output_dir holds the trained weights (gathered, equal to the last sharded checkpoint's),
    config and tokenizer, as every other engine leaves them; checkpoints stay sharded (DCP) for resuming."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, _ = three_fsdp2_steps
    out = Path(config["output_dir"])
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint-3" / "model.safetensors").exists()
    saved, start = weights(out), weights(tiny_model)
    trained = sharded_weights(out / "checkpoint-3", tmp_path)
    assert set(saved) == set(trained)
    for key, value in trained.items():
        assert torch.equal(saved[key], value), key
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], trained["lm_head.weight"], atol=0, rtol=0)
    assert AutoTokenizer.from_pretrained(out)("hello")["input_ids"]


def test_mfsgd_inspect_state_prints_the_factor_table_of_an_fsdp2_checkpoint(three_fsdp2_steps):
    config, workdir = three_fsdp2_steps
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mfsgd-inspect-state"), config["output_dir"]],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 3, 14 MoFaSGD matrices)" in proc.stdout
    assert "model.layers.1.mlp.down_proj.weight" in proc.stdout and "64 x 256" in proc.stdout


def test_fsdp2_resume_without_optimizer_0_warns_that_the_momentum_starts_from_scratch(three_fsdp2_steps):
    """Issue 22 item 6, end to end: the weights resume from the sharded checkpoint, MoFaSGD's state cannot."""
    config, workdir = three_fsdp2_steps
    checkpoint = workdir / "no-optimizer" / "checkpoint-3"
    shutil.copytree(Path(config["output_dir"]) / "checkpoint-3", checkpoint)
    shutil.rmtree(checkpoint / "optimizer_0")
    resumed = dict(config, output_dir=str(workdir / "resumed"), max_steps=4, resume_from_checkpoint=str(checkpoint))
    proc = run_cli(resumed, workdir, extra_env=TWO_FSDP2_PROCESSES)
    assert_ok(proc)
    assert proc.stdout.count("holds no optimizer state (no optimizer_0/") == 1  # once, on rank 0
    assert "MoFaSGD's momentum factors (U, S, V) and the AdamW moments start from scratch" in proc.stdout


EXIT_DRAIN_PROBE = """
import os
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import FullyShardedDataParallelPlugin
import llamafactory_mfsgd.cpu_emulation as cpu_emulation
import llamafactory_mfsgd.gloo_exit as gloo_exit

def say(line):  # one write per line: the two ranks share the pipe (print may write a line in pieces)
    os.write(1, (line + "\\n").encode())

gloo_exit._let_gloo_workers_finish = lambda: say("DRAINED")  # what the atexit handler runs
cpu_emulation.allow_cpu_fsdp2()
for _ in range(2):  # a second state must not add a second wait
    state = Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2)).state
say("PROBE " + state.distributed_type.name)
say("LATER " + AcceleratorState().distributed_type.name)  # a later state copies PartialState's type over it
"""


@pytest.mark.parametrize("flag, kind, drains", [("1", "FSDP", 1), ("0", "MULTI_CPU", 0)])
def test_the_cpu_fsdp2_mode_waits_for_gloo_workers_at_exit(tmp_path, flag, kind, drains):
    """MFSGD_CPU_FSDP2=1 turns accelerate's CPU processes into FSDP2 ones, for good, and runs one wait at exit
    (gloo's worker threads freeing FSDP2's all-gathers after shutdown began abort about 1 run in 10 without it)."""
    script = tmp_path / "probe.py"
    script.write_text(EXIT_DRAIN_PROBE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    proc = subprocess.run(
        [*command, str(free_port()), str(script)],
        env={**os.environ, "MFSGD_CPU_FSDP2": flag},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines.count(f"PROBE {kind}") == 2  # both ranks
    assert lines.count(f"LATER {kind}") == 2  # FSDP stays FSDP (else accelerate's get_state_dict does not gather)
    assert lines.count("DRAINED") == 2 * drains  # once per rank, however many states were built


GLOO_DRAIN_PROBE = """
import os
import sys
import torch.distributed as dist
import llamafactory_mfsgd.gloo_exit as gloo_exit

# each rank writes whole lines to its own file: two ranks printing to one pipe interleave their words
log = open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".log"), "w", buffering=1)
gloo_exit._let_gloo_workers_finish = lambda: log.write("DRAINED\\n")
log.write(f"BEFORE {gloo_exit.drain_gloo_at_exit()}\\n")  # no process group yet: nothing registered
dist.init_process_group("gloo")
log.write(f"AFTER {gloo_exit.drain_gloo_at_exit()} {gloo_exit.drain_gloo_at_exit()}\\n")
dist.destroy_process_group()
"""


def test_any_multi_process_gloo_run_waits_for_gloo_workers_at_exit(tmp_path):
    """DeepSpeed ZeRO-3 and DDP on CPU processes hit the same exit abort as FSDP2: the Trainer callback registers
    the wait once per process whenever a gloo group of several ranks exists."""
    script = tmp_path / "probe.py"
    script.write_text(GLOO_DRAIN_PROBE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    proc = subprocess.run(
        [*command, str(free_port()), str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        lines = (tmp_path / f"rank{rank}.log").read_text().splitlines()
        assert lines == ["BEFORE False", "AFTER True True", "DRAINED"]  # drained once per rank, though asked twice
