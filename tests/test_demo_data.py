import json
from pathlib import Path

import pytest

from llamafactory_mfsgd.tulu3_categories import REPORT
from scripts.make_demo_data import EVAL_FILE, TRAIN_FILE, main
from scripts.prepare_tulu3_subsets import OTHER

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
source_category = REPORT.category_of


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("file_name", [TRAIN_FILE, EVAL_FILE])
def test_rows_follow_the_tulu3_sft_schema(file_name):
    rows = _rows(DATA / file_name)

    assert rows
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"id", "messages", "source"}
        roles = [message["role"] for message in row["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(set(message) == {"role", "content"} and message["content"] for message in row["messages"])
        assert source_category(row["source"]) != OTHER


def test_committed_files_equal_what_the_script_regenerates(tmp_path):
    main(["--out-dir", str(tmp_path)])

    for file_name in (TRAIN_FILE, EVAL_FILE):
        assert (tmp_path / file_name).read_bytes() == (DATA / file_name).read_bytes(), file_name


def test_eval_rows_are_held_out_from_train():
    train = {json.dumps(row["messages"], sort_keys=True) for row in _rows(DATA / TRAIN_FILE)}
    held_out = [json.dumps(row["messages"], sort_keys=True) for row in _rows(DATA / EVAL_FILE)]

    assert not train.intersection(held_out)


def test_demo_data_spans_several_categories_and_stays_small():
    categories = {source_category(row["source"]) for row in _rows(DATA / TRAIN_FILE)}
    size = sum((DATA / name).stat().st_size for name in (TRAIN_FILE, EVAL_FILE))

    assert {"math", "coding", "instruction_following", "safety", "multilingual"} <= categories
    assert size < 300_000


def test_llamafactory_reads_every_demo_row_as_a_valid_conversation():
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments

    for attr in get_dataset_list(["tulu3_demo", "tulu3_demo_eval"], str(DATA)):
        converter = get_dataset_converter(attr.formatting, attr, DataArguments())
        for row in _rows(DATA / attr.dataset_name):
            converted = converter(row)
            system = row["messages"][0]["content"] if row["messages"][0]["role"] == "system" else ""
            assert converted["_system"] == system
            assert converted["_response"] == [row["messages"][-1]]
            assert converted["_prompt"] == [m for m in row["messages"][:-1] if m["role"] != "system"]
