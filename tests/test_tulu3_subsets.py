import json
from pathlib import Path

import pytest

from llamafactory_mfsgd.tulu3_categories import AUTHORS, REPORT, load_rows, split_rows
from scripts import prepare_tulu3_subsets
from scripts.prepare_tulu3_subsets import CATEGORIES, OTHER, dataset_entry, main

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tulu3_mixture_sample.jsonl"
SOURCE_CATEGORIES = REPORT.source_category
source_category = REPORT.category_of

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


# --- The authors' category datasets `tulu3_mixture_<category>` (llamafactory_mfsgd.tulu3_mixture) ---------------

# The fixture's rows per category of the authors' mapping, counted by hand from its sources. Sources the authors
# do not list (allenai/tulu-3-sft-personas-code, example-org/unlisted_dataset) belong to no category.
AUTHORS_FIXTURE_COUNTS = {
    "general": 4,
    "knowledge_recall": 3,
    "math_reasoning": 7,
    "coding": 2,
    "safety_compliance": 3,
    "multilingual": 1,
    "precise_if": 1,
}


@pytest.mark.parametrize(
    ("source", "category"),
    [
        ("ai2-adapt-dev/tulu_v3.9_sciriff_10k", "knowledge_recall"),
        ("ai2-adapt-dev/flan_v2_converted", "knowledge_recall"),
        ("ai2-adapt-dev/tulu_v3.9_table_gpt_5k", "knowledge_recall"),
        ("allenai/tulu-3-sft-personas-math-grade", "math_reasoning"),
        ("ai2-adapt-dev/personahub_ifdata_manual_seed_v3_29980", "precise_if"),
        ("ai2-adapt-dev/coconot_converted", "safety_compliance"),
        ("ai2-adapt-dev/tulu_hard_coded_repeated_10", "general"),
        ("some-mirror/evol_codealpaca_heval_decontaminated", "coding"),
        ("allenai/tulu-3-sft-personas-code", None),
        ("example-org/unlisted_dataset", None),
    ],
)
def test_authors_mapping_puts_each_source_in_its_category(source, category):
    assert AUTHORS.category_of(source) == category


def test_authors_mapping_covers_the_same_sources_as_the_report_mapping():
    assert set(AUTHORS.source_category) == set(SOURCE_CATEGORIES)


def test_committed_dataset_info_registers_the_authors_names():
    from llamafactory_mfsgd.tulu3_mixture import dataset_entry

    info = json.loads((ROOT / "data" / "dataset_info.json").read_text())
    for category in AUTHORS.sources:
        assert info[f"tulu3_mixture_{category}"] == dataset_entry(category)
    assert set(AUTHORS.sources) == set(AUTHORS_FIXTURE_COUNTS)


# The fixture's row ids per category of each scheme, as the two splitters wrote them before they became one.
REPORT_FIXTURE_IDS = {
    "coding": ["sample_005", "sample_006", "sample_021"],
    "general": ["sample_008", "sample_009", "sample_010", "sample_011"],
    "instruction_following": ["sample_007"],
    "knowledge": ["sample_012", "sample_013"],
    "math": ["sample_000", "sample_001", "sample_002", "sample_003", "sample_004", "sample_019", "sample_020"],
    "multilingual": ["sample_017"],
    "other": ["sample_022"],
    "safety": ["sample_014", "sample_015", "sample_016"],
    "science": ["sample_018"],
}
AUTHORS_FIXTURE_IDS = {
    "coding": ["sample_005", "sample_006"],
    "general": ["sample_008", "sample_009", "sample_010", "sample_011"],
    "knowledge_recall": ["sample_012", "sample_013", "sample_018"],
    "math_reasoning": [
        "sample_000",
        "sample_001",
        "sample_002",
        "sample_003",
        "sample_004",
        "sample_019",
        "sample_020",
    ],
    "multilingual": ["sample_017"],
    "precise_if": ["sample_007"],
    "safety_compliance": ["sample_014", "sample_015", "sample_016"],
}


@pytest.mark.parametrize(
    ("scheme", "categories", "expected_ids"),
    [(REPORT, CATEGORIES + [OTHER], REPORT_FIXTURE_IDS), (AUTHORS, None, AUTHORS_FIXTURE_IDS)],
    ids=["report", "authors"],
)
def test_both_schemes_go_through_the_one_splitter_and_split_as_before(scheme, categories, expected_ids, tmp_path):
    counts = split_rows(load_rows(str(FIXTURE)), scheme, tmp_path, categories)

    assert counts == {category: len(ids) for category, ids in expected_ids.items()}
    written = {path.stem: _rows(path) for path in tmp_path.glob("*.jsonl")}
    assert {category: [row["id"] for row in rows] for category, rows in written.items()} == expected_ids
    by_id = {row["id"]: row for row in _rows(FIXTURE)}
    assert all(row == by_id[row["id"]] for rows in written.values() for row in rows)
    assert not list(tmp_path.glob(".*partial"))


@pytest.fixture()
def dataset_dir(tmp_path):
    """A dataset directory holding a copy of the committed dataset_info.json and nothing prepared."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text((ROOT / "data" / "dataset_info.json").read_text())
    return tmp_path / "data"


def test_first_use_prepares_every_authors_subset_once_and_reuses_it(dataset_dir, monkeypatch):
    from llamafactory_mfsgd import tulu3_mixture

    monkeypatch.setenv(tulu3_mixture.MIXTURE_ENV, str(FIXTURE))
    tulu3_mixture.ensure_subsets(["tulu3_mixture_knowledge_recall", "tulu3_demo"], dataset_dir)

    out = dataset_dir / "tulu3_mixture"
    assert {path.stem: len(_rows(path)) for path in out.glob("*.jsonl")} == AUTHORS_FIXTURE_COUNTS
    for category in AUTHORS_FIXTURE_COUNTS:
        expected = [row for row in _rows(FIXTURE) if AUTHORS.category_of(row["source"]) == category]
        assert _rows(out / f"{category}.jsonl") == expected
    assert not list(out.glob(".*partial"))

    def no_second_load(*args, **kwargs):
        raise AssertionError("the mixture was loaded again")

    monkeypatch.setattr(tulu3_mixture, "load_rows", no_second_load)
    tulu3_mixture.ensure_subsets(["tulu3_mixture_coding", "tulu3_mixture_precise_if"], dataset_dir)


def test_prepare_command_writes_the_subsets(dataset_dir, capsys):
    from llamafactory_mfsgd.tulu3_mixture import main as prepare_main

    prepare_main(["--dataset-dir", str(dataset_dir), "--mixture", str(FIXTURE)])

    assert "tulu3_mixture_safety_compliance" in capsys.readouterr().out
    assert len(_rows(dataset_dir / "tulu3_mixture" / "safety_compliance.jsonl")) == 3


def _parse(dataset_dir, tmp_path, dataset):
    from lf_helpers import tiny_config
    from llamafactory.hparams import get_train_args

    config = tiny_config("tiny_sft_adamw.yaml", tmp_path / "no-model", tmp_path / "out", dataset=dataset)
    config.update(dataset_dir=str(dataset_dir))
    config.pop("eval_dataset", None)
    return get_train_args(config)


def test_offline_unprepared_subset_fails_at_parse_time_naming_the_command(dataset_dir, tmp_path, monkeypatch):
    from llamafactory_mfsgd.tulu3_mixture import MIXTURE_ENV, prepare_command

    monkeypatch.delenv(MIXTURE_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="not prepared") as error:
        _parse(dataset_dir, tmp_path, "tulu3_mixture_coding")
    assert prepare_command(dataset_dir) in str(error.value)
    assert not (dataset_dir / "tulu3_mixture").exists()


def test_parsing_a_config_prepares_the_subsets_llamafactory_then_resolves(dataset_dir, tmp_path, monkeypatch):
    from llamafactory.data.parser import get_dataset_list

    from llamafactory_mfsgd.tulu3_mixture import MIXTURE_ENV

    monkeypatch.setenv(MIXTURE_ENV, str(FIXTURE))
    _, data_args, _, _, _ = _parse(dataset_dir, tmp_path, "tulu3_mixture_coding,tulu3_mixture_general")

    attrs = get_dataset_list(data_args.dataset, data_args.dataset_dir)
    assert [attr.dataset_name for attr in attrs] == ["tulu3_mixture/coding.jsonl", "tulu3_mixture/general.jsonl"]
    assert [len(_rows(dataset_dir / attr.dataset_name)) for attr in attrs] == [2, 4]
