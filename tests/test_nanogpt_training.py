import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.nanogpt.build_offline_corpus import build_offline_corpus
from scripts.nanogpt.config import HIDDEN_DEFAULTS, load_config
from scripts.nanogpt.train import train

ROOT = Path(__file__).resolve().parents[1]

FROZEN_ADAM = {"embed_lr": 0.0, "head_lr": 0.0, "scalar_lr": 0.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    build_offline_corpus(out, max_train_tokens=300_000, max_val_tokens=20_000)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices run faster on one thread, and much faster when other jobs share the CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(optimizer, corpus, out_dir, **sections):
    """A 2-layer, width-64 GPT on the offline corpus; two micro-batches of 8 x 64 tokens per step."""
    values = {
        "model": {"vocab_size": 320, "depth": 2, "width": 64, "heads": 2},
        "data": {"train_files": str(corpus / "train_*.bin"), "val_files": str(corpus / "val_*.bin")},
        "train": {"steps": 30, "seq_len": 64, "batch_tokens": 1024, "micro_batch_size": 8, "val_every": 1000,
                  "val_tokens": 4096, "device": "cpu"},
        "out_dir": str(out_dir),
    }  # fmt: skip
    for section, overrides in sections.items():
        values[section] = {**values.get(section, {}), **overrides}
    return load_config(optimizer, overrides=values)


def read_log(summary):
    return [json.loads(line) for line in open(Path(summary["run_dir"]) / "log.jsonl")]


def train_losses(records):
    return [r["train_loss"] for r in records if "train_loss" in r]


@pytest.mark.parametrize("optimizer", list(HIDDEN_DEFAULTS))
def test_each_optimizer_lowers_the_loss_by_training_only_the_hidden_matrices(optimizer, corpus, tmp_path):
    # Adam's part (embeddings, head, gains) is frozen, so any progress is the compared optimizer's doing.
    torch.manual_seed(0)
    config = tiny(optimizer, corpus, tmp_path, adam=FROZEN_ADAM)
    summary = train(config)
    losses = train_losses(read_log(summary))
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.1, losses
    assert summary["final_val_loss"] < losses[0] - 0.1


def test_with_frozen_hidden_matrices_the_same_loss_stays_flat(corpus, tmp_path):
    # The control for the test above: the same run with a zero learning rate does not learn.
    summary = train(tiny("sgd", corpus, tmp_path, adam=FROZEN_ADAM, hidden={"lr": 0.0}))
    losses = train_losses(read_log(summary))
    assert abs(sum(losses[-5:]) / 5 - sum(losses[:3]) / 3) < 0.05


@pytest.mark.parametrize("optimizer", list(HIDDEN_DEFAULTS))
def test_resume_continues_identically(optimizer, corpus, tmp_path):
    sections = {"train": {"steps": 6, "val_every": 2, "checkpoint_every": 3}}
    full = train(tiny(optimizer, corpus, tmp_path / "full", **sections))
    checkpoint = Path(full["run_dir"]) / "checkpoints" / "step_000003.pt"
    sections["train"] = sections["train"] | {"resume_from": str(checkpoint)}
    resumed = train(tiny(optimizer, corpus, tmp_path / "resumed", **sections))

    def losses(summary):
        return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_log(summary)]

    assert losses(resumed) == losses(full)
    final_full = torch.load(Path(full["run_dir"]) / "checkpoints" / "step_000006.pt", weights_only=True)
    final_resumed = torch.load(Path(resumed["run_dir"]) / "checkpoints" / "step_000006.pt", weights_only=True)
    for name, tensor in final_full["model"].items():
        assert torch.equal(tensor, final_resumed["model"][name]), name
    assert final_full["loader"] == final_resumed["loader"]
    assert resumed["hidden_state_bytes"] == full["hidden_state_bytes"] > 0


def test_run_writes_log_plot_and_summary(corpus, tmp_path):
    config = tiny("mfsgd", corpus, tmp_path, train={"steps": 5, "val_every": 2}, hidden={"rank": 4})
    summary = train(config)
    run_dir = Path(summary["run_dir"])
    assert run_dir.name == config.run_name and run_dir.name.startswith("mfsgd_r4_")
    records = read_log(summary)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4, 5]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in records if "train_loss" in r)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["final_val_loss"] == records[-1]["val_loss"]
    assert summary["tokens"] == 5 * 1024
    assert "optimizer: mfsgd" in (run_dir / "config.yaml").read_text()


def expected_hidden_state_bytes(optimizer, shapes, rank):
    total = 0
    for m, n in shapes:
        if optimizer == "mfsgd":  # fp32 U (m x r), S (r), V (n x r) and a scalar step
            total += 4 * ((m + n) * rank + rank) + 4
        elif optimizer == "galore":  # Adam moments of the projected gradient + the projection basis
            projected, basis = (m * rank, rank * n) if m >= n else (rank * n, m * rank)
            total += 4 * (2 * projected + basis)
        elif optimizer == "adamw":
            total += 4 * 2 * m * n + 4
        else:  # muon and sgd: one momentum buffer
            total += 4 * m * n
    return total


@pytest.mark.parametrize("optimizer", list(HIDDEN_DEFAULTS))
def test_optimizer_state_bytes_are_counted_per_method(optimizer, corpus, tmp_path):
    hidden = {"rank": 4} if optimizer in ("mfsgd", "galore") else {}
    summary = train(tiny(optimizer, corpus, tmp_path, train={"steps": 2}, hidden=hidden))
    shapes = [(64, 64)] * 4 + [(256, 64), (64, 256)]  # q, k, v, out, up, down
    assert summary["hidden_state_bytes"] == 2 * expected_hidden_state_bytes(optimizer, shapes, 4)
    assert summary["total_state_bytes"] > summary["hidden_state_bytes"]


def test_memory_snapshot_on_cpu_says_it_records_nothing(corpus, tmp_path, caplog):
    config = tiny("adamw", corpus, tmp_path, train={"steps": 2}, mem_prof={"enabled": True, "stop_step": 1})
    with caplog.at_level(logging.WARNING, logger="nanogpt"):
        summary = train(config)
    assert "CUDA memory snapshots need a CUDA device" in caplog.text
    assert not (Path(summary["run_dir"]) / "memory_snapshot.pickle").exists()


def test_token_ids_beyond_the_vocabulary_are_reported(corpus, tmp_path):
    with pytest.raises(ValueError, match="model.vocab_size"):
        train(tiny("sgd", corpus, tmp_path, model={"vocab_size": 200}))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("optimizer", ["mfsgd", "adamw"])
def test_two_processes_match_one_process_with_accumulation(optimizer, corpus, tmp_path):
    # One process with two micro-batches per step sees exactly the tokens two processes see together.
    single = train(tiny(optimizer, corpus, tmp_path / "one", train={"steps": 4, "val_every": 2}))
    config = json.dumps(tiny(optimizer, corpus, tmp_path / "two", train={"steps": 4, "val_every": 2}).to_dict())
    command = [sys.executable, "-m", "scripts.nanogpt.run", "--optimizer", optimizer]
    command += ["--config", config, "--num-gpus", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    two = json.loads(next((tmp_path / "two").glob("*/summary.json")).read_text())
    one_losses, two_losses = train_losses(read_log(single)), train_losses(read_log(two))
    assert two["world_size"] == 2
    assert two_losses == pytest.approx(one_losses, rel=1e-4)
    assert two["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=1e-4)
