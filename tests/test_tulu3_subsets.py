import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tulu3_mixture_sample.jsonl"
sys.path.insert(0, str(ROOT / "scripts"))

import prepare_tulu3_subsets  # noqa: E402
from prepare_tulu3_subsets import (  # noqa: E402
    CATEGORIES,
    OTHER,
    SOURCE_CATEGORIES,
    dataset_entry,
    main,
    source_category,
)

# What the fixture holds, counted by hand from its sources.
FIXTURE_COUNTS = {
    "coding": 3,
    "general": 4,
    "instruction_following": 1,
    "knowledge": 2,
    "math": 7,
    "multilingual": 1,
    "safety": 3,
    "science": 1,
    "other": 1,
}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(
    ("source", "category"),
    [
        ("ai2-adapt-dev/personahub_code_v2_34999", "coding"),
        ("ai2-adapt-dev/evol_codealpaca_heval_decontaminated", "coding"),
        ("allenai/tulu-3-sft-personas-math-grade", "math"),
        ("ai2-adapt-dev/tulu_v3.9_personahub_math_interm_algebra_20k", "math"),
        ("ai2-adapt-dev/personahub_ifdata_manual_seed_v3_29980", "instruction_following"),
        ("ai2-adapt-dev/flan_v2_converted", "knowledge"),
        ("ai2-adapt-dev/tulu_v3.9_wildchat_100k", "general"),
        ("ai2-adapt-dev/tulu_v3.9_wildjailbreak_decontaminated_50k", "safety"),
        ("ai2-adapt-dev/tulu_v3.9_aya_100k", "multilingual"),
        ("ai2-adapt-dev/tulu_v3.9_sciriff_10k", "science"),
        ("some-mirror/personahub_code_v2_34999", "coding"),
        ("allenai/tulu-3-sft-personas-code", "coding"),
        ("allenai/tulu-3-sft-personas-instruction-following", "instruction_following"),
        ("allenai/tulu-3-personas-algebra", "math"),
        ("example-org/unlisted_dataset", OTHER),
    ],
)
def test_source_maps_to_its_category(source, category):
    assert source_category(source) == category


def test_mapping_table_is_documented_in_the_module_docstring():
    doc = prepare_tulu3_subsets.__doc__
    assert set(SOURCE_CATEGORIES.values()) == set(CATEGORIES)
    for source in SOURCE_CATEGORIES:
        assert source in doc, source
    for category in CATEGORIES:
        assert f"\n{category} " in doc, category


def test_split_writes_one_file_per_category_with_the_fixture_counts(tmp_path):
    out = tmp_path / "subsets"
    main(["--input", str(FIXTURE), "--out", str(out), "--categories", "all"])

    counts = {path.stem: len(_rows(path)) for path in out.glob("*.jsonl")}
    assert counts == FIXTURE_COUNTS
    assert sum(counts.values()) == len(_rows(FIXTURE))


def test_subset_rows_are_unchanged_in_schema_and_order(tmp_path):
    out = tmp_path / "subsets"
    main(["--input", str(FIXTURE), "--out", str(out), "--categories", "math,coding"])

    assert sorted(path.name for path in out.iterdir()) == ["coding.jsonl", "math.jsonl"]
    for category in ("math", "coding"):
        expected = [row for row in _rows(FIXTURE) if source_category(row["source"]) == category]
        assert _rows(out / f"{category}.jsonl") == expected


def test_max_per_category_keeps_the_first_rows(tmp_path):
    out = tmp_path / "subsets"
    main(["--input", str(FIXTURE), "--out", str(out), "--categories", "math", "--max-per-category", "2"])

    expected = [row for row in _rows(FIXTURE) if source_category(row["source"]) == "math"][:2]
    assert _rows(out / "math.jsonl") == expected


def test_parquet_input_drops_extra_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(FIXTURE)
    parquet = tmp_path / "mixture.parquet"
    pq.write_table(pa.Table.from_pylist([{**row, "extra": 1} for row in rows]), parquet)
    main(["--input", str(parquet), "--out", str(tmp_path / "subsets"), "--categories", "safety"])

    expected = [row for row in rows if source_category(row["source"]) == "safety"]
    assert _rows(tmp_path / "subsets" / "safety.jsonl") == expected


def test_dataset_info_is_merged_with_paths_relative_to_it(tmp_path):
    info_path = tmp_path / "data" / "dataset_info.json"
    info_path.parent.mkdir()
    info_path.write_text(json.dumps({"keep_me": {"file_name": "x.jsonl"}}))
    out = tmp_path / "data" / "tulu3_subsets"
    args = ["--input", str(FIXTURE), "--out", str(out), "--categories", "coding,science"]
    main([*args, "--dataset-info", str(info_path)])

    info = json.loads(info_path.read_text())
    assert set(info) == {"keep_me", "tulu3_coding", "tulu3_science"}
    for name in ("tulu3_coding", "tulu3_science"):
        assert info[name] == dataset_entry(info[name]["file_name"])
        assert _rows(info_path.parent / info[name]["file_name"])


def test_unknown_category_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--input", str(FIXTURE), "--out", str(tmp_path), "--categories", "coding,poetry"])


def test_committed_dataset_info_matches_the_script():
    info = json.loads((ROOT / "data" / "dataset_info.json").read_text())

    for category in CATEGORIES:
        assert info[f"tulu3_{category}"] == dataset_entry(f"tulu3_subsets/{category}.jsonl")
    for name in ("tulu3_demo", "tulu3_demo_eval"):
        assert info[name] == dataset_entry(f"{name}.jsonl")
    hub = {key: value for key, value in dataset_entry("").items() if key != "file_name"}
    assert info["tulu3_sft_mixture"] == {"hf_hub_url": "allenai/tulu-3-sft-mixture", **hub}
