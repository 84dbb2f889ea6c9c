"""The benchmark scripts' pure parts: table building, step-window memory, fidelity errors, sweep selection."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import compare_methods, harness, lf_bench, momentum_fidelity, quality_sweep

CATEGORIES = ["parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail"]


def _timeline(times: list[int], rows: list[list[int]]) -> dict:
    return {"categories": CATEGORIES, "times_us": times, "bytes": rows}


def _run(step_ms: list[float], losses: dict, timeline: dict, measured: dict) -> lf_bench.RunResult:
    steps, t = [], 1000
    for i, ms in enumerate(step_ms, start=1):
        steps.append({"step": i, "begin_us": t, "end_us": t + int(ms * 1000)})
        t += int(ms * 1000) + 10
    history = [{"loss": losses["train"], "step": len(step_ms)}, {"eval_loss": losses["eval"]}]
    summary = {"method": "CPU torch.profiler memory timeline", "measured": measured, "peak": {"total_bytes": 999}}
    timing = {"steps": steps, "trainable_params": 10, "total_params": 20}
    return lf_bench.RunResult(Path("."), timing, history, summary, timeline)


def test_window_peak_counts_memory_held_when_the_window_opens():
    timeline = _timeline(
        [0, 10, 20, 30], [[50, 0, 0, 0, 0, 0, 0], [5, 0, 0, 0, 1, 0, 0], [5, 0, 0, 0, 2, 0, 0], [9] * 7]
    )
    assert lf_bench.window_peak(timeline, 12, 25)["total_bytes"] == 7
    assert lf_bench.window_peak(timeline, 10, 25)["by_profiler_category"]["activation"] == 2
    assert lf_bench.window_peak(timeline, 0, 30)["total_bytes"] == 63


def test_median_step_skips_warmup_and_refuses_empty():
    steps = [{"begin_us": 0, "end_us": d} for d in (9_000_000, 1_000_000, 3_000_000, 2_000_000)]
    assert lf_bench.median_step_seconds(steps, 1) == 2.0
    with pytest.raises(ValueError):
        lf_bench.median_step_seconds(steps, 4)


def test_method_config_applies_shared_rank_and_fused_switches(tmp_path):
    lora = lf_bench.method_config("lora", tmp_path, tmp_path / "o", 16, max_steps=3)
    assert (lora["lora_rank"], lora["lora_alpha"], lora["max_steps"]) == (16, 32, 3)
    assert lf_bench.method_config("galore_fused", tmp_path, tmp_path, 4)["galore_fused"] is True
    mofasgd = lf_bench.method_config("mofasgd", tmp_path, tmp_path, 4)
    assert (mofasgd["mfsgd_rank"], mofasgd["mfsgd_fused"], mofasgd["save_strategy"]) == (4, True, "no")


def test_table_rows_split_step_peak_and_ratio_to_adamw(tmp_path):
    # step 1's spike (900 activation bytes at 1500 us) is over before step 2 opens at 2010 us.
    timeline = _timeline(
        [0, 1500, 1800, 2500, 3000],
        [
            [100, 0, 0, 0, 0, 0, 0],
            [100, 0, 0, 0, 900, 0, 0],
            [100, 0, 0, 0, 0, 0, 0],
            [100, 30, 5, 0, 40, 20, 1],
            [100, 30, 0, 0, 0, 0, 0],
        ],
    )
    adamw = _run([1.0, 1.0, 4.0, 4.0], {"train": 2.0, "eval": 2.5}, timeline, {"optimizer_state": 30})
    mofasgd = _run([1.0, 1.0, 2.0, 2.0], {"train": 2.1, "eval": 2.4}, timeline, {"optimizer_state": 3})
    rows = [
        compare_methods.method_row("adamw", adamw, adamw, 2),
        compare_methods.method_row("mofasgd", mofasgd, mofasgd, 2),
    ]
    compare_methods.add_ratios(rows)
    peak = rows[0]["step_peak"]
    assert peak["total_bytes"] == 196
    assert peak["breakdown"] == {
        "parameters": 100,
        "gradients": 20,
        "optimizer_state": 30,
        "activations": 40,
        "other": 6,
    }
    assert [r["step_time_ratio"] for r in rows] == [1.0, 0.5]
    assert (rows[1]["optimizer_state_bytes"], rows[1]["eval_loss"], rows[1]["final_train_loss"]) == (3, 2.4, 2.1)

    table = {
        "setup": {
            "model": "m",
            "model_params": 20,
            "rank": 8,
            "steps": 4,
            "profile_step": 2,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "cutoff_len": 128,
        },
        "machine": {"device": "CPU", "processor": "x", "python": "3", "torch": "t"},
        "rows": rows,
        "notes": compare_methods.notes("CPU torch.profiler memory timeline", 4, 2),
    }
    markdown = compare_methods.render_markdown(table)
    assert "| mofasgd | 10 | 0.00 |" in markdown and "| 0.50 | 2.1000 | 2.4000 |" in markdown
    files = harness.save_results(
        table, "t", tmp_path, tmp_path / "results", compare_methods.render_markdown, compare_methods.plot
    )
    assert [p.name for p in files] == ["t.md", "t.json", "t.png"] and all(p.stat().st_size > 0 for p in files)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["t.json", "t.md", "t.png"]


def test_best_rank_error_is_zero_at_full_rank_and_the_tail_below_it():
    assert momentum_fidelity.best_rank_error(torch.randn(5, 3), 3) < 1e-12
    assert math.isclose(momentum_fidelity.best_rank_error(torch.diag(torch.tensor([4.0, 3.0])), 1), 0.6)
    low_rank = torch.randn(7, 2) @ torch.randn(2, 6)
    assert momentum_fidelity.best_rank_error(low_rank, 2) < 1e-7


def test_relative_error_of_exact_and_truncated_factors():
    M = torch.diag(torch.tensor([4.0, 3.0]))
    eye = torch.eye(2)
    assert momentum_fidelity.relative_error(M, eye, torch.tensor([4.0, 3.0]), eye) == 0.0
    assert math.isclose(momentum_fidelity.relative_error(M, eye[:, :1], torch.tensor([4.0]), eye[:, :1]), 0.6)


@pytest.mark.parametrize("init", ["weight", "gradient"])
def test_full_rank_mofasgd_tracks_the_full_momentum_exactly(init):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=True), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    batches = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(5)]
    tracked = {"0": model[0].weight, "2": model[2].weight}

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    history = momentum_fidelity.track_fidelity(model, loss_fn, batches, tracked, 3, init, 0.9, 1e-2, 1e-2)
    for errors in history["matrices"].values():
        assert max(errors["mofasgd"]) < 1e-5 and max(errors["best"]) < 1e-7
    low = momentum_fidelity.track_fidelity(model, loss_fn, batches, {"0": model[0].weight}, 1, init, 0.9, 1e-2, 1e-2)
    errors = low["matrices"]["0"]
    assert all(b <= e + 1e-9 for e, b in zip(errors["mofasgd"], errors["best"]))
    assert max(errors["best"]) > 1e-3


def test_sweep_picks_lowest_eval_loss_and_flags_grid_edges():
    records = [
        {"variant": "a", "lr": 1.0, "eval_loss": 3.0, "train_loss": 3.0},
        {"variant": "a", "lr": 2.0, "eval_loss": 2.0, "train_loss": 2.0},
        {"variant": "a", "lr": 3.0, "eval_loss": 2.5, "train_loss": 2.5},
        {"variant": "b", "lr": 1.0, "eval_loss": None, "train_loss": None},
        {"variant": "b", "lr": 2.0, "eval_loss": 4.0, "train_loss": 4.0},
    ]
    best = quality_sweep.best_per_variant(records)
    assert [(r["variant"], r["lr"]) for r in best] == [("a", 2.0), ("b", 2.0)]
    assert not quality_sweep.at_grid_edge(best[0], records) and quality_sweep.at_grid_edge(best[1], records)
    assert set(quality_sweep.VARIANTS) >= {"mofasgd_inv_weight", "mofasgd_ones_gradient", "adamw", "lora", "galore"}


def test_tiny_step_parts_times_each_part_and_bounds_the_ratio(capsys, monkeypatch):
    from benchmarks import tiny_step_parts

    monkeypatch.setattr(sys, "argv", ["tiny_step_parts.py", "--blocks", "3", "--lf-adamw-ms", "20"])
    monkeypatch.setattr(tiny_step_parts, "solver_seconds", lambda cls, steps=200: 0.001)  # 1 ms, to check the sum
    monkeypatch.setattr(tiny_step_parts, "bare_projection_seconds", lambda blocks: 0.0005)
    tiny_step_parts.main()
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"AdamW", "MoFaSGD"}
    hooks = float(rows["MoFaSGD"].split("|")[2]) - float(rows["AdamW"].split("|")[2])  # table values: rounded
    printed_hooks = float(re.search(r"gradient hooks add (\S+) ms", out).group(1))
    assert printed_hooks == pytest.approx(hooks, abs=2e-3)
    match = re.search(r"solver calls 1.000 ms \+ bare projections 0.500 ms = (\S+) ms .* at least (\S+)", out)
    floor, ratio = (float(x) for x in match.groups())
    assert floor == pytest.approx(1.5)
    assert ratio == pytest.approx(1 + 1.5 / 20, abs=1e-3)


def test_bare_projecting_hooks_time_a_hooked_and_a_plain_backward(monkeypatch):
    """The difference is a measurement (its sign is noise on a loaded 2-core machine): test what is timed."""
    from benchmarks import tiny_step_parts

    timed_variants, real = [], tiny_step_parts.take_turns

    def spy(variants, blocks):
        timed_variants.append(sorted(variants))
        return real(variants, blocks)

    monkeypatch.setattr(tiny_step_parts, "take_turns", spy)
    assert math.isfinite(tiny_step_parts.bare_projection_seconds(blocks=4))
    assert timed_variants == [["hooked", "plain"]]


def test_tiny_step_parts_times_the_solver_calls_of_a_step():
    from benchmarks import tiny_step_parts
    from mofasgd import MoFaSGD

    assert tiny_step_parts.solver_seconds(MoFaSGD, steps=8) > 0
    assert tiny_step_parts.solver_seconds(None, steps=8) == 0  # AdamW calls no solver
    assert torch.linalg.qr.__name__ == "linalg_qr"  # the timers are removed again


def test_layer_step_counts_clipping_and_step_ops(capsys, monkeypatch):
    from benchmarks import layer_step

    monkeypatch.setattr(sys, "argv", ["layer_step.py", "--ops", "--scale", "64", "--layers", "2"])
    layer_step.main()
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if "x 8B layer" in line]
    counts = {row[3].strip(): [int(row[i]) for i in (4, 5, 6)] for row in rows}
    assert set(counts) == {"MoFaSGD", "AdamW"}
    for clip, step, total in counts.values():
        assert clip > 0 and step > 0 and total == clip + step


def test_linear_layer_bench_counts_half_the_backward_flops_on_the_projected_path():
    """The 8B-shaped layer benchmark at 1/64 width: every method builds and steps, and the projected backward's
    matrix products are dX only (about half of AdamW's dX + dW), the hook path's are dX + dW."""
    from benchmarks import linear_layer_step as bench

    dims = (bench.HIDDEN // 64, bench.KV // 64, bench.FFN // 64)
    torch.manual_seed(0)
    state = bench.DecoderLayerLinears(*dims).state_dict()
    x, target = torch.randn(16, dims[0]), torch.randn(16, dims[0])
    flops = {}
    for method in bench.METHODS:
        model, optimizer = bench.build(method, state, dims, torch.float32, rank=4)
        bench.timed(model, optimizer, x, target)
        flops[method] = bench.counted_flops(model, optimizer, x, target)
    assert flops["mofasgd_hook"][0] == flops["mofasgd_projected"][0] == flops["adamw"][0]
    assert flops["mofasgd_hook"][1] >= flops["adamw"][1]  # dX + dW (+ the hook's projections)
    assert 0.45 < flops["mofasgd_projected"][1] / flops["adamw"][1] < 0.6


def test_capture_check_runs_the_capturable_step_beside_the_eager_one(capsys):
    """Without CUDA the script runs the eager and capturable steps and says that the graph needs a GPU."""
    from benchmarks import capture_check

    capture_check.main(["--scale", "64", "--steps", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    gap = float(out.split("capturable vs eager weights: max |diff| ")[1].split()[0])
    assert gap < 1e-6
    assert "capturable: clip + step" in out and "host syncs in one clip + step: 0" in out
    assert "graph: capture needs CUDA; not run" in out
