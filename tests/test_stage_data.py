"""The small datasets of the pt, dpo/rm and kto stages: regenerated as committed, read by LLaMA-Factory as meant."""

import json
from pathlib import Path

import pytest

from scripts.make_stage_data import KTO_FILE, PREF_FILE, SOURCE_FILE, TEXT_FILE, main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _converted(name: str) -> list[tuple[dict, dict]]:
    """(raw row, LLaMA-Factory's converted example) for every row of the dataset registered as `name`."""
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments

    (attr,) = get_dataset_list([name], str(DATA))
    converter = get_dataset_converter(attr.formatting, attr, DataArguments())
    return [(row, converter(row)) for row in _rows(DATA / attr.dataset_name)]


def test_committed_files_equal_what_the_script_regenerates(tmp_path):
    main(["--data-dir", str(DATA), "--out-dir", str(tmp_path)])

    for file_name in (TEXT_FILE, PREF_FILE, KTO_FILE):
        assert (tmp_path / file_name).read_bytes() == (DATA / file_name).read_bytes(), file_name


def test_preference_rows_pair_the_demo_answer_with_another_answer():
    demo = _rows(DATA / SOURCE_FILE)
    pairs = _converted("tulu3_demo_pref")
    assert len(pairs) == 128
    for (row, example), source in zip(pairs, demo):
        assert row["messages"] + [row["chosen"]] == source["messages"]
        assert example["_response"] == [row["chosen"], row["rejected"]]
        assert row["rejected"]["content"] != row["chosen"]["content"]
        assert example["_prompt"] == [m for m in row["messages"] if m["role"] != "system"]


def test_kto_rows_alternate_desirable_and_undesirable_answers():
    pref = {row["id"].removeprefix("tulu3_demo_pref_"): row for row in _rows(DATA / PREF_FILE)}
    examples = _converted("tulu3_demo_kto")
    assert [row["label"] for row, _ in examples] == [i % 2 == 0 for i in range(len(examples))]
    empty = {"role": "assistant", "content": ""}
    for row, example in examples:
        pair = pref[row["id"].removeprefix("tulu3_demo_kto_")]
        answer = pair["chosen"] if row["label"] else pair["rejected"]
        assert row["messages"][-1] == answer
        # LLaMA-Factory's KTO layout: the answer first when desirable, after an empty one when not
        assert example["_response"] == ([answer, empty] if row["label"] else [empty, answer])


def test_text_rows_are_whole_conversations_as_one_prompt():
    demo = _rows(DATA / SOURCE_FILE)
    examples = _converted("tulu3_demo_text")
    assert len(examples) == 128
    for (row, example), source in zip(examples, demo):
        assert example["_prompt"] == [{"role": "user", "content": row["text"]}]
        assert all(message["content"] in row["text"] for message in source["messages"])


@pytest.mark.parametrize("name", ["tulu3_demo_text", "tulu3_demo_pref", "tulu3_demo_kto"])
def test_stage_datasets_are_registered_and_small(name):
    info = json.loads((DATA / "dataset_info.json").read_text())
    assert (DATA / info[name]["file_name"]).stat().st_size < 60_000
