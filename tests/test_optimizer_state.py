"""mfsgd-inspect-state: rank, spectrum, effective rank and momentum norm per MoFaSGD matrix; S over checkpoints."""

import json

import pytest
import torch
from lf_helpers import assert_ok, run_cli, tiny_config

from mofasgd import MoFaSGD
from mofasgd.inspect_state import effective_rank, main, read_states


@pytest.mark.parametrize(
    "spectrum,expected", [([1.0, 1.0, 1.0, 1.0], 4.0), ([2.0, 0.0, 0.0], 1.0), ([0.0, 0.0], 0.0), ([3.0, 1.0], 1.7547)]
)
def test_effective_rank_is_the_exponential_of_the_spectrum_entropy(spectrum, expected):
    assert effective_rank(torch.tensor(spectrum)) == pytest.approx(expected, abs=1e-4)


def _checkpoint(tmp_path, optimizer, step_dir="checkpoint-2"):
    path = tmp_path / step_dir
    path.mkdir()
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    return path


def test_states_match_the_optimizer_and_the_dense_momentum(tmp_path):
    torch.manual_seed(0)
    matrices = [torch.nn.Parameter(torch.randn(12, 7)), torch.nn.Parameter(torch.randn(5, 9))]
    bias = torch.nn.Parameter(torch.randn(7))
    optimizer = MoFaSGD([{"params": matrices}, {"params": [bias], "mofasgd": False}], rank=3, lr=1e-2)
    for _ in range(2):
        (sum((m**3).sum() for m in matrices) + bias.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()

    states = read_states(_checkpoint(tmp_path, optimizer))

    assert [s.name for s in states] == ["matrix 0", "matrix 1"]  # no param_names outside HF Trainer
    for s, matrix in zip(states, matrices):
        factors = optimizer.state[matrix]
        momentum = factors["U"] @ torch.diag(factors["S"]) @ factors["V"].T
        assert s.shape == tuple(matrix.shape) and s.rank == 3 and s.step == 2
        assert s.spectrum == pytest.approx(factors["S"].tolist())
        assert s.momentum_norm == pytest.approx(float(momentum.norm()), rel=1e-5)
        assert 1.0 <= s.effective_rank <= 3.0


def test_a_sharded_fsdp2_checkpoint_reads_as_its_optimizer_pt_does(tmp_path, capsys):
    """accelerate's FSDP2 checkpoint layout, `optimizer_0/` (DCP) keyed by parameter names, written here by one
    process: the same table as the full state in an optimizer.pt, names included."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 12), torch.nn.Linear(12, 5, bias=False))
    matrices = [model[0].weight, model[1].weight]
    optimizer = MoFaSGD([{"params": matrices}, {"params": [model[0].bias], "mofasgd": False}], rank=3, lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, 7)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    by_name = get_optimizer_state_dict(model, optimizer)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    dcp.save({"optimizer": by_name}, checkpoint_id=str(checkpoint / "optimizer_0"), no_dist=True)
    torch.save(by_name, tmp_path / "optimizer.pt")

    states = read_states(checkpoint)
    assert states == read_states(tmp_path / "optimizer.pt")
    assert [s.name for s in states] == ["0.weight", "1.weight"] and [s.shape for s in states] == [(12, 7), (5, 12)]
    assert states[1].spectrum == pytest.approx(optimizer.state[matrices[1]]["S"].tolist()) and states[1].step == 2
    assert main([str(checkpoint / "optimizer_0")]) == 0
    assert "1.weight" in capsys.readouterr().out


def test_a_checkpoint_without_mofasgd_state_is_refused(tmp_path):
    weight = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.AdamW([weight])
    weight.sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="no MoFaSGD param group"):
        read_states(_checkpoint(tmp_path, optimizer))


@pytest.mark.slow
def test_tiny_run_checkpoints_print_and_plot_the_spectrum_over_steps(tiny_model, tmp_path, capsys):
    config = tiny_config("tiny_sft_mfsgd.yaml", tiny_model, tmp_path / "run", max_steps=6, save_steps=3)
    assert_ok(run_cli(config, tmp_path))
    plot, summary = tmp_path / "spectrum.png", tmp_path / "state.json"

    assert main([str(tmp_path / "run"), "--plot", str(plot), "--json", str(summary)]) == 0

    out = capsys.readouterr().out
    assert out.count("14 MoFaSGD matrices") == 2 and "model.layers.1.mlp.down_proj.weight" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000
    history = json.loads(summary.read_text())
    assert [entry["step"] for entry in history] == [3, 6]
    for entry in history:
        assert len(entry["matrices"]) == 14
        assert all(m["rank"] == config["mfsgd_rank"] == len(m["spectrum"]) for m in entry["matrices"])
    first, last = ({m["name"]: m for m in entry["matrices"]} for entry in history)
    assert any(first[name]["spectrum"] != last[name]["spectrum"] for name in first)  # S moved between checkpoints
