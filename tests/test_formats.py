"""The neutral format, the label-alignment table, BIO and chat round trips, answer parsing."""

import json

import pytest

from conftest import write_jsonl
from lingtune.data.convert import convert_file, read_chat
from lingtune.formats import Entity, FormatError, Record, from_bio, read_bio, read_jsonl, to_bio
from lingtune import tasks
from lingtune.data.convert import from_messages, to_messages
from lingtune.tasks.ner import locate_entities

NER = Record(text="江泽民在北京会见北京大学代表，江泽民说。", entities=(
    Entity(start=0, end=3, type="PER", text="江泽民"),
    Entity(start=4, end=6, type="LOC", text="北京"),
    Entity(start=8, end=12, type="ORG", text="北京大学"),
    Entity(start=15, end=18, type="PER", text="江泽民"),
))
SENT = Record(text="这本书很好看，推荐！", label="positive")


def test_task_is_inferred_and_spans_are_checked():
    assert NER.task == "ner" and SENT.task == "sentiment"
    with pytest.raises(ValueError, match="not '北京'"):
        Record(text="上海很好", entities=(Entity(start=0, end=2, type="LOC", text="北京"),))
    with pytest.raises(ValueError, match="outside the text"):
        Record(text="上海", entities=(Entity(start=0, end=5, type="LOC", text="上海"),))
    with pytest.raises(ValueError, match="exactly one of"):
        Record(text="x", label="positive", entities=())


def test_reader_aligns_labels_and_names_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"text": "好书", "label": "正面"},
        {"text": "差", "label": 0},
        {"text": "江泽民", "entities": [{"start": 0, "end": 3, "type": "人名", "text": "江泽民"}]},
    ])
    records = read_jsonl(path)
    assert [r.label for r in records[:2]] == ["positive", "negative"]
    assert records[2].entities[0].type == "PER"
    assert [r.task for r in read_jsonl(path, task="ner")] == ["ner"]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "好书", "label": "positive"}, "{not json",
                                                {"text": "好书", "label": "so-so"}])
    with pytest.raises(FormatError, match=r"bad.jsonl:2: not JSON"):
        read_jsonl(bad)
    write_jsonl(bad, [{"text": "好书", "label": "so-so"}])
    with pytest.raises(FormatError, match=r"bad.jsonl:1: label"):
        read_jsonl(bad)
    write_jsonl(bad, [{"text": "", "label": "positive", "extra": 1}])
    with pytest.raises(FormatError, match=r"text: .*extra: "):
        read_jsonl(bad)


def test_bio_round_trip(tmp_path):
    pairs = to_bio(NER)
    assert pairs[:4] == [("江", "B-PER"), ("泽", "I-PER"), ("民", "I-PER"), ("在", "O")]
    assert from_bio(pairs) == Record(text=NER.text, entities=NER.entities)
    convert_file(write_jsonl(tmp_path / "n.jsonl", [NER.model_dump(exclude_none=True, mode="json")]),
                 tmp_path / "n.bio", "neutral", "bio")
    assert read_bio(tmp_path / "n.bio")[0].entities == NER.entities
    with pytest.raises(FormatError, match="unknown tag 'B-MISC'"):
        from_bio([("a", "B-MISC")])


def test_chat_round_trip_keeps_repeated_entities_in_place():
    messages = to_messages(NER)
    assert messages[0]["role"] == "user" and messages[0]["content"].endswith("文本：" + NER.text)
    answer = json.loads(messages[1]["content"])
    assert [e["text"] for e in answer["entities"]] == ["江泽民", "北京", "北京大学", "江泽民"]
    assert from_messages(messages) == Record(text=NER.text, entities=NER.entities)
    assert json.loads(to_messages(SENT)[1]["content"]) == {"label": "positive"}
    assert from_messages(to_messages(SENT)) == Record(text=SENT.text, label="positive")


def test_one_template_for_both_tasks():
    a, b = to_messages(SENT)[0]["content"], to_messages(NER)[0]["content"]
    assert a.split("\n")[0].startswith("任务：") and b.split("\n")[0].startswith("任务：")
    assert a.split("\n")[-1].startswith("文本：") and b.split("\n")[-1].startswith("文本：")


def test_chat_file_conversion_and_refusals(tmp_path):
    src = write_jsonl(tmp_path / "n.jsonl", [NER.model_dump(exclude_none=True, mode="json"),
                                             SENT.model_dump(exclude_none=True, mode="json")])
    assert convert_file(src, tmp_path / "c.jsonl", "neutral", "chat") == 2
    assert [r.task for r in read_chat(tmp_path / "c.jsonl")] == ["ner", "sentiment"]
    with pytest.raises(FormatError, match="same file"):
        convert_file(src, src, "neutral", "chat")
    with pytest.raises(FormatError, match="unknown format 'xml'"):
        convert_file(src, tmp_path / "o", "neutral", "xml")
    with pytest.raises(FormatError, match="BIO export is for NER"):
        convert_file(src, tmp_path / "o.bio", "neutral", "bio")
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hello"}]}])
    with pytest.raises(FormatError, match="bad.jsonl:1: not a lingtune chat example"):
        read_chat(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("answer, label", [
    ('{"label": "positive"}', "positive"),
    ('```json\n{"label": "负面"}\n```', "negative"),
    ('答案是 {"label": "neg"} 。', "negative"),
])
def test_parse_sentiment_answers(answer, label):
    parsed = tasks.get("sentiment").parse(answer)
    assert parsed.valid and parsed.label == label


@pytest.mark.parametrize("task, answer, error", [
    ("sentiment", '{"label": "neutral"}', "unknown label"),
    ("sentiment", "positive", "no JSON object"),
    ("sentiment", '{"label": "positive"', "no JSON object"),
    ("ner", '{"entities": "江泽民"}', "not a list"),
    ("ner", '{"entities": [{"text": "江泽民", "type": "MISC"}]}', "bad entity"),
    ("ner", "[1, 2]", "no JSON object"),
])
def test_parse_rejects_malformed_answers(task, answer, error):
    parsed = tasks.get(task).parse(answer)
    assert not parsed.valid and error in parsed.error


def test_locate_rule_for_repeated_and_missing_strings():
    text = "北京和上海，北京"
    located, missing = locate_entities(text, [("北京", "LOC"), ("北京", "LOC"), ("广州", "LOC")])
    assert [(e.start, e.end) for e in located] == [(0, 2), (6, 8)]
    assert missing == [("广州", "LOC")]
    # out of order: falls back to the first occurrence nobody has taken
    located, _ = locate_entities(text, [("上海", "LOC"), ("北京", "LOC")])
    assert [(e.text, e.start) for e in located] == [("上海", 3), ("北京", 6)]
    # more mentions in the answer than in the text: the extra one is not placed twice
    located, missing = locate_entities(text, [("北京", "LOC"), ("上海", "LOC"), ("北京", "LOC"), ("北京", "LOC")])
    assert [e.start for e in located] == [0, 3, 6] and missing == [("北京", "LOC")]
