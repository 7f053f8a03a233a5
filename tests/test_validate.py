"""The Great Expectations suite passes on prepared data and names broken rows."""

import json
import subprocess
import sys

import pytest

from conftest import write_jsonl
from lingtune.config import parse_params
from lingtune.data.validate import ValidationFailed, validate_dataset


def good_rows(split):
    return [
        {"id": f"{split}-1", "task": "sentiment", "text": f"{split} 这本书很好看，推荐！", "label": "positive"},
        {"id": f"{split}-2", "task": "sentiment", "text": f"{split} 质量太差了，不推荐。", "label": "negative"},
        {"id": f"{split}-3", "task": "ner", "text": f"{split} 江泽民在北京会见代表。",
         "entities": [{"start": len(split) + 1, "end": len(split) + 4, "type": "PER", "text": "江泽民"},
                      {"start": len(split) + 5, "end": len(split) + 7, "type": "LOC", "text": "北京"}]},
    ]


def params_for(tmp_path):
    return parse_params({"data": {"out_dir": str(tmp_path / "data")},
                         "validate": {"report": str(tmp_path / "report.json")}})


def write_splits(tmp_path, overrides=None):
    for split in ("train", "val", "test"):
        rows = (overrides or {}).get(split, good_rows(split))
        write_jsonl(tmp_path / "data" / f"{split}.jsonl", rows)


def test_clean_data_passes(tmp_path):
    write_splits(tmp_path)
    params = params_for(tmp_path)
    report = validate_dataset(params.data, params.validate_)
    assert report["success"] and report["failed"] == 0
    assert json.loads((tmp_path / "report.json").read_text())["success"] is True


def test_broken_rows_are_named(tmp_path):
    train = good_rows("train") + [
        {"id": "b1", "text": "", "label": "positive"},                                   # line 4: empty
        {"id": "b2", "text": "这个东西一般般吧", "label": "so-so"},                         # line 5: label
        {"id": "b3", "text": "李鹏在上海考察工作", "entities": [
            {"start": 0, "end": 2, "type": "PER", "text": "李鹏"},
            {"start": 1, "end": 4, "type": "LOC", "text": "鹏在上"},                        # overlap
            {"start": 3, "end": 5, "type": "LOC", "text": "北京"},                          # mismatch
            {"start": 7, "end": 30, "type": "GPE", "text": "工作"}]},                       # outside, type
        "{this is not json",                                                              # line 7
        {"id": "b5", "text": "test 这本书很好看，推荐！", "label": "positive"},               # dup of test
    ]
    write_splits(tmp_path, {"train": train})
    params = params_for(tmp_path)
    with pytest.raises(ValidationFailed) as err:
        validate_dataset(params.data, params.validate_)
    message = str(err.value)
    failed = {(c["table"], c["column"], c["expectation"]): c["failing_rows"]
              for c in err.value.report["checks"] if not c["success"]}
    # the unparsable line 7 has no text either, so it fails the length check too
    assert failed[("sentiment", "text", "expect_column_value_lengths_to_be_between")] == [
        "train.jsonl:4", "train.jsonl:7"]
    assert failed[("sentiment", "label", "expect_column_values_to_be_in_set")] == ["train.jsonl:5"]
    assert failed[("entities", "overlaps_previous", "expect_column_values_to_be_in_set")] == [
        "train.jsonl:6#1", "train.jsonl:6#2"]
    assert failed[("entities", "span_matches_text", "expect_column_values_to_be_in_set")] == [
        "train.jsonl:6#2", "train.jsonl:6#3"]
    assert failed[("entities", "span_inside_text", "expect_column_values_to_be_in_set")] == ["train.jsonl:6#3"]
    assert failed[("entities", "type", "expect_column_values_to_be_in_set")] == ["train.jsonl:6#3"]
    assert "train.jsonl:7" in failed[("sentiment", "parsed", "expect_column_values_to_be_in_set")]
    assert set(failed[("sentiment", "key", "expect_column_values_to_be_unique")]) == {"train.jsonl:8", "test.jsonl:1"}
    assert "train.jsonl:4" in message and "report" in message
    assert json.loads((tmp_path / "report.json").read_text())["success"] is False


def test_class_imbalance_is_caught(tmp_path):
    rows = [r for r in good_rows("val") if r.get("label") != "negative"]
    write_splits(tmp_path, {"val": rows})
    params = params_for(tmp_path)
    with pytest.raises(ValidationFailed, match=r"splits.positive_share.*val.jsonl"):
        validate_dataset(params.data, params.validate_)


def test_cli_exits_non_zero_with_the_rows(tmp_path, root):
    write_splits(tmp_path, {"test": good_rows("test") + [{"id": "x", "text": "好", "label": "maybe"}]})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"data:\n  out_dir: {tmp_path}/data\nvalidate:\n  report: {tmp_path}/r.json\n")
    result = subprocess.run([sys.executable, "-m", "lingtune.cli", "validate", "--params", str(params_file)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "test.jsonl:4" in result.stderr and "Traceback" not in result.stderr
