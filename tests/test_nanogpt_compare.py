import json
from pathlib import Path

import numpy as np
import pytest

from scripts.nanogpt import compare
from scripts.nanogpt.build_offline_corpus import build_offline_corpus
from scripts.nanogpt.data import read_shard
from scripts.nanogpt.prepare_fineweb import write_token_shards


def test_variants_parse_into_optimizer_and_typed_hidden_overrides():
    assert compare.parse_variant("mfsgd:rank=8,lr=1e-3,nesterov=true") == (
        "mfsgd",
        {"rank": 8, "lr": "1e-3", "nesterov": True},  # "1e-3" is coerced to a float by the config layer
    )
    assert compare.parse_variant("muon") == ("muon", {})
    assert compare.variant_label("galore:rank=8,scale=0.5") == "galore rank=8 scale=0.5"
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        compare.parse_variant("lion:lr=1")
    with pytest.raises(ValueError, match="expected key=value"):
        compare.parse_variant("mfsgd:rank8")


def test_compare_rejects_a_bad_variant_key_before_running_anything(capsys, tmp_path):
    assert compare.main(["--variants", "sgd", "mfsgd:rnak=8", "--out-dir", str(tmp_path)]) == 2
    assert "unknown config key 'hidden.rnak'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_compare_runs_each_variant_on_the_same_tokens_and_writes_table_and_png(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    build_offline_corpus(corpus, max_train_tokens=100_000, max_val_tokens=10_000)
    shared = {
        "model": {"vocab_size": 320, "depth": 1, "width": 32, "heads": 2},
        "data": {"train_files": str(corpus / "train_*.bin"), "val_files": str(corpus / "val_*.bin")},
        "train": {"seq_len": 32, "batch_tokens": 256, "micro_batch_size": 8, "val_every": 2, "val_tokens": 1024,
                  "device": "cpu", "cpu_threads": 1},
    }  # fmt: skip
    out = tmp_path / "cmp"
    args = ["--variants", "sgd", "muon:lr=0.02", "--config", json.dumps(shared), "--steps", "3", "--out-dir", str(out)]
    assert compare.main(args) == 0

    printed = capsys.readouterr().out
    assert "768 training tokens per run (3 steps)" in printed
    rows = json.loads((out / "comparison.json").read_text())
    assert [row["label"] for row in rows] == ["sgd", "muon lr=0.02"]
    assert rows[1]["hidden"]["lr"] == 0.02 and rows[0]["hidden"]["lr"] == 0.1
    table = (out / "comparison.md").read_text()
    for row in rows:
        assert f"| {row['label']} | {row['final_val_loss']:.4f} |" in table
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # --reuse keeps finished runs: the summaries are not rewritten.
    stamps = [Path(row["run_dir"], "summary.json").stat().st_mtime_ns for row in rows]
    assert compare.main([*args, "--reuse"]) == 0
    assert [Path(row["run_dir"], "summary.json").stat().st_mtime_ns for row in rows] == stamps


def test_fineweb_shards_put_the_first_shard_in_validation_and_keep_every_token(tmp_path):
    documents = [np.arange(start, start + size, dtype=np.uint16) for start, size in [(0, 7), (100, 12), (200, 5)]]
    paths = write_token_shards(iter(documents), tmp_path, shard_tokens=10)
    assert [p.name for p in paths] == [
        "fineweb_val_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
    ]
    np.testing.assert_array_equal(np.concatenate([read_shard(p) for p in paths]), np.concatenate(documents))
    assert [read_shard(p).size for p in paths] == [10, 10, 4]

    capped = write_token_shards(iter(documents), tmp_path / "capped", shard_tokens=10, max_tokens=15)
    np.testing.assert_array_equal(np.concatenate([read_shard(p) for p in capped]), np.concatenate(documents)[:15])
