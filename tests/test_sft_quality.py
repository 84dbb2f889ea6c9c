"""Pure parts of the quality evidence: the SFT sweep's grid logic and results, the pre-training baselines and
schedule, the NanoGPT multi-seed aggregation. No training runs here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import lf_bench, sft_quality
from scripts import build_pretrained_llama
from scripts.nanogpt import seeds

ROOT = Path(__file__).resolve().parent.parent

CENTER = 1e-3
INITIAL = [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2]


def test_initial_grid_is_five_half_decade_points_around_the_centre():
    assert sft_quality.next_lrs(CENTER, {}, 5, 3) == INITIAL
    assert sft_quality.next_lrs(CENTER, {1e-3: 2.0, 1e-4: 3.0}, 5, 3) == [3.16e-4, 3.16e-3, 1e-2]
    assert [sft_quality.grid_index(CENTER, lr) for lr in INITIAL] == [-2, -1, 0, 1, 2]


def test_grid_extends_beyond_an_edge_best_until_it_is_interior():
    high_best = dict(zip(INITIAL, [5.0, 4.0, 3.0, 2.5, 2.0]))
    assert sft_quality.next_lrs(CENTER, high_best, 5, 3) == [3.16e-2]
    low_best = dict(zip(INITIAL, [1.0, 2.0, 3.0, 4.0, 5.0]))
    assert sft_quality.next_lrs(CENTER, low_best, 5, 3) == [3.16e-5]
    # the extension was worse: the best is now inside the grid, the sweep is settled
    assert sft_quality.next_lrs(CENTER, {**high_best, 3.16e-2: 2.2}, 5, 3) == []
    # it was better still: keep going
    assert sft_quality.next_lrs(CENTER, {**high_best, 3.16e-2: 1.9}, 5, 3) == [0.1]
    assert sft_quality.next_lrs(CENTER, dict(zip(INITIAL, [5.0, 4.0, 1.0, 2.5, 2.0])), 5, 3) == []


def test_diverged_rates_count_as_worse_and_extension_is_capped():
    diverged_top = dict(zip(INITIAL, [5.0, 4.0, 3.0, 2.0, None]))
    assert sft_quality.next_lrs(CENTER, diverged_top, 5, 3) == []
    assert sft_quality.best_lr(diverged_top) == 3.16e-3
    all_diverged = dict.fromkeys(INITIAL)
    assert sft_quality.next_lrs(CENTER, all_diverged, 5, 3) == [3.16e-5]
    assert sft_quality.best_lr(all_diverged) is None
    extended = {**dict(zip(INITIAL, [5.0, 4.0, 3.0, 2.5, 2.0])), 3.16e-2: 1.9, 0.1: 1.8}
    assert sft_quality.next_lrs(CENTER, extended, 5, 2) == []
    assert sft_quality.at_edge(0.1, extended)


def _run(variant, lr, seed, loss, method="adamw", precision="fp32", rank=None):
    return {
        "variant": variant,
        "method": method,
        "rank": rank,
        "precision": precision,
        "lr": lr,
        "seed": seed,
        "eval_loss": loss,
        "status": "ok" if loss is not None else "diverged",
        "train_loss": 1.0,
        "step_time_s": 0.5 + seed,
        "peak_rss_mib": 100.0 * (seed + 1),
    }


def _runs():
    runs = [_run("adamw_fp32", lr, 0, loss) for lr, loss in zip(INITIAL, [5.0, 3.0, 2.0, 4.0, None])]
    runs += [_run("adamw_fp32", 1e-3, 1, 2.2), _run("adamw_fp32", 1e-3, 2, 2.4)]
    runs += [_run("lora_r8_fp32", lr, 0, loss, "lora", rank=8) for lr, loss in zip(INITIAL, [5, 4, 3, 2, 1.0])]
    return runs


def test_summary_averages_the_seeds_at_the_best_rate_and_flags_edges():
    adamw, lora = sft_quality.summarize(_runs())
    assert adamw["best_lr"] == 1e-3 and adamw["seeds"] == [0, 1, 2] and not adamw["edge"]
    assert adamw["eval_loss_mean"] == pytest.approx(2.2)
    assert adamw["eval_loss_std"] == pytest.approx(0.2)
    assert adamw["diverged_lrs"] == [1e-2]
    assert adamw["step_time_s"] == pytest.approx(1.5) and adamw["peak_rss_mib"] == 300.0
    assert lora["best_lr"] == 1e-2 and lora["edge"] and lora["eval_loss_std"] is None


def test_results_are_a_list_of_runs_and_the_page_says_what_was_not_done(tmp_path):
    setup = {"base": {"path": "models/x"}, "steps": 10, "points": 5, "max_extend": 3, "seeds": 3}
    setup.update(mfsgd_adamw_lr=1e-3, batch="4 x 2", wall_s=1.0)
    result = {"setup": setup, "machine": {"device": "CPU (2 cores)", "torch": "2"}, "runs": _runs()}
    sft_quality.write_results(result, tmp_path, str(tmp_path / "results"))
    runs = json.loads((tmp_path / "results" / "sft_quality.json").read_text())
    assert isinstance(runs, list) and len(runs) == 12
    assert {"method", "lr", "seed", "eval_loss", "precision", "rank"} <= set(runs[0])
    page = (tmp_path / "results" / "sft_quality.md").read_text()
    assert "| adamw |  | fp32 | 0.001 | 2.2000 ± 0.2000 | 3 |" in page
    assert "**best lr at the grid edge**" in page and "only 1 seed(s)" in page
    assert "mofasgd_ones_weight_r8_bf16" in page.split("## Not done")[1]  # never run: listed
    assert "lora_r8_fp32" in page.split("incomplete")[1]
    assert (tmp_path / "results" / "sft_quality.png").stat().st_size > 0


def test_full_grid_has_every_method_form_rank_and_precision():
    names = set(sft_quality.VARIANTS)
    assert len(names) == 34
    assert {"adamw_fp32", "lora_r32_bf16", "galore_fused_r8_fp32", "mofasgd_inv_gradient_r4_bf16"} <= names
    assert {"mofasgd_ones_weight_r32_fp32", "mofasgd_inv_weight_r8_fp32"} <= names


def _fake_training(configs):
    def run_training(config, timeout):
        configs.append(config)
        steps = [{"begin_us": 0, "end_us": 10**5}] * 3
        history = [{"eval_loss": 5.0}, {"loss": 2.0}, {"eval_loss": 1.5}]
        return lf_bench.RunResult(
            Path(config["output_dir"]), {"steps": steps, "max_rss_kib": 2048}, history, None, None
        )

    return run_training


@pytest.mark.parametrize(
    ("state", "fused", "run_name"),
    [
        ("full", False, "lr0.003_alr0.00316_seed1"),
        ("factored_no_momentum", False, "lr0.003_alr0.00316_factored_no_momentum_seed1"),
        ("factored_no_momentum", True, "lr0.003_alr0.00316_factored_no_momentum_fusedside_seed1"),
    ],
)
def test_mofasgd_runs_name_and_record_a_compact_adamw_state_only_when_not_full(
    monkeypatch, tmp_path, state, fused, run_name
):
    configs = []
    monkeypatch.setattr(sft_quality, "run_training", _fake_training(configs))
    args = sft_quality.argparse.Namespace(
        out=str(tmp_path),
        mfsgd_adamw_lr=3.16e-3,
        mfsgd_adamw_state=state,
        mfsgd_fused_adamw_side=fused,
        steps=10,
        timeout=1,
        retry_failed=False,
        report_only=False,
    )
    variant = sft_quality.VARIANTS["mofasgd_inv_weight_r8_fp32"]
    record = sft_quality.run_one(variant, 3e-3, 1, args, tmp_path / "model")
    (config,) = configs
    assert Path(config["output_dir"]) == tmp_path / "runs" / variant.name / run_name
    assert config["mfsgd_adamw_state"] == state and config["learning_rate_adamw"] == 3.16e-3
    assert record["eval_loss"] == 1.5 and record["adamw_lr"] == 3.16e-3
    assert record.get("adamw_state") == (None if state == "full" else state)
    assert config["mfsgd_fused_adamw_side"] is fused and record.get("fused_adamw_side") == (True if fused else None)
    assert sft_quality.run_one(variant, 3e-3, 1, args, tmp_path / "model") == record and len(configs) == 1  # reused
    sft_quality.run_one(sft_quality.VARIANTS["adamw_fp32"], 1e-3, 0, args, tmp_path / "model")
    assert "mfsgd_adamw_state" not in configs[-1] and configs[-1]["output_dir"].endswith("lr0.001_seed0")


def test_report_only_reads_the_finished_runs_and_starts_none(monkeypatch, tmp_path):
    configs = []

    def run_training(config, timeout):  # eval loss lowest at lr 1e-3, AdamW's grid centre
        configs.append(config)
        loss = 1 + (math.log10(config["learning_rate"]) + 3) ** 2 + config["seed"] / 100
        steps = [{"begin_us": 0, "end_us": 10**5}] * 3
        return lf_bench.RunResult(Path(config["output_dir"]), {"steps": steps}, [{"eval_loss": loss}], None, None)

    monkeypatch.setattr(sft_quality, "run_training", run_training)
    args = sft_quality.argparse.Namespace(
        out=str(tmp_path), steps=10, timeout=1, retry_failed=False, report_only=False, points=5, max_extend=3, seeds=3
    )
    variant = sft_quality.VARIANTS["adamw_fp32"]
    full = sft_quality.sweep_variant(variant, args, tmp_path / "model", math.inf)
    assert len(configs) == len(full) == 7  # 5 grid points, 2 more seeds at 1e-3
    (tmp_path / "runs" / variant.name / "lr0.001_seed2" / "record.json").unlink()
    args.report_only = True
    partial = sft_quality.sweep_variant(variant, args, tmp_path / "model", math.inf)
    assert len(configs) == 7 and partial == full[:-1]
    assert sft_quality.sweep_variant(sft_quality.VARIANTS["galore_r8_fp32"], args, tmp_path, math.inf) == []
    assert len(configs) == 7
    args.report_only = False
    assert sft_quality.sweep_variant(variant, args, tmp_path / "model", math.inf) == full and len(configs) == 8


def test_unigram_baseline_and_schedule():
    assert build_pretrained_llama.unigram_cross_entropy([], [0, 1, 2, 3], 4) == pytest.approx(math.log(4))
    # counts with add-one: token 0 -> 4 of 5, token 1 -> 1 of 5
    assert build_pretrained_llama.unigram_cross_entropy([0, 0, 0], [0, 1], 2) == pytest.approx(
        -(math.log(4 / 5) + math.log(1 / 5)) / 2
    )
    lr = build_pretrained_llama.lr_at
    assert lr(0, 100, 10, 1.0) == pytest.approx(0.1) and lr(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr(10, 100, 10, 1.0) == pytest.approx(1.0) and lr(100, 100, 10, 1.0) == pytest.approx(0.1)


def test_base_size_presets_fill_only_the_flags_not_given(tmp_path, monkeypatch):
    small = build_pretrained_llama.parse_args([])
    assert (small.hidden, small.layers, small.intermediate, small.steps, small.lr) == (128, 4, 352, 400, 3e-3)
    large = build_pretrained_llama.parse_args(["--size", "10m", "--layers", "2"])
    assert (large.hidden, large.layers, large.heads, large.kv_heads, large.threads) == (320, 2, 10, 5, 2)
    for preset in build_pretrained_llama.SIZES.values():  # head size 32, whole query groups
        assert preset["hidden"] // preset["heads"] == 32 and preset["heads"] % preset["kv_heads"] == 0
    commands = []
    monkeypatch.setattr(sft_quality.subprocess, "run", lambda command, check, cwd: commands.append(command))
    sft_quality.ensure_pretrained(tmp_path / "base", "10m", None)
    assert commands[0][1:3] == ["-m", "scripts.build_pretrained_llama"]
    assert commands[0][3:] == ["--size", "10m", "--out", str(tmp_path / "base")]
    assert sft_quality.BASES["10m"].name == "pretrained-llama-10m"


def test_nanogpt_seed_runs_set_the_seed_and_shorten_only_the_warmups_that_exist():
    args = seeds.argparse.Namespace(config='{"train": {"val_every": 10}}', steps=50, warmup=20, out_dir="o")
    args.config_path = "scripts/nanogpt/cpu.yaml"
    mfsgd = json.loads(seeds.run_argv("mfsgd", {"rank": 32}, 2, args)[3])
    assert mfsgd["train"] == {"val_every": 10, "seed": 2, "steps": 50}
    assert mfsgd["hidden"] == {"rank": 32, "beta_warmup_steps": 20}
    assert json.loads(seeds.run_argv("adamw", {}, 0, args)[3])["hidden"] == {}
    assert json.loads(seeds.run_argv("muon", {}, 0, args)[3])["hidden"] == {"momentum_warmup_steps": 20}


def test_nanogpt_seed_aggregate_and_bad_variant(capsys, tmp_path):
    base = {"hidden_state_bytes": 2**20, "total_state_bytes": 2**21, "tokens": 10, "steps": 1, "tokens_per_s": 5.0}
    rows = seeds.aggregate("x", [{**base, "final_val_loss": v, "best_val_loss": v} for v in (1.0, 2.0, 3.0)])
    assert (rows["final_val_loss_mean"], rows["final_val_loss_std"], rows["hidden_state_mib"]) == (2.0, 1.0, 1.0)
    assert "| x | 3 | 2.0000 ± 1.0000 | 1.0000, 2.0000, 3.0000 |" in seeds.table([rows])
    assert seeds.main(["--variants", "mfsgd:rnak=8", "--out-dir", str(tmp_path)]) == 2
    assert "hidden.rnak" in capsys.readouterr().err
