"""Error analysis per example (`Task.explain`, `lingtune eval --predictions`), the bootstrap's per-example
metrics agreeing with the task metrics, and evaluation files that carry keys of their own."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl
from lingtune import tasks
from lingtune.errors import FormatError
from lingtune.evaluate.run import evaluate_file
from lingtune.formats import read_jsonl, read_user_jsonl
from lingtune.models import ModelRef
from lingtune.predictions import example_rows
from lingtune.records import Record

DATA = Path(__file__).parent / "data"
TEXT = "江泽民在北京会见李鹏。"
GOLD = ({"start": 0, "end": 3, "type": "PER", "text": "江泽民"}, {"start": 4, "end": 6, "type": "LOC", "text": "北京"},
        {"start": 8, "end": 10, "type": "PER", "text": "李鹏"})


def ner_answer(*pairs) -> str:
    return json.dumps({"entities": [{"text": t, "type": y} for t, y in pairs]}, ensure_ascii=False)


def perturbed(record: Record, rng: random.Random) -> str:
    """An answer with the mistakes models make: an entity dropped, repeated, retyped or invented; or no JSON."""
    if record.task == "sentiment":
        return rng.choice(['{"label": "positive"}', '{"label": "negative"}', "好评"])
    pairs = [(e.text, e.type) for e in record.entities]
    if pairs and rng.random() < 0.3:
        pairs.pop(rng.randrange(len(pairs)))
    if pairs and rng.random() < 0.3:
        pairs.append(rng.choice(pairs))
    if pairs and rng.random() < 0.3:
        i = rng.randrange(len(pairs))
        pairs[i] = (pairs[i][0], "ORG" if pairs[i][1] != "ORG" else "PER")
    if rng.random() < 0.2:
        pairs.append(("子虚乌有", "LOC"))
    return "oops" if rng.random() < 0.05 else ner_answer(*pairs)


def test_ner_explain_names_missed_spurious_and_wrong_type():
    record = Record(text=TEXT, entities=GOLD)
    row = tasks.get("ner").explain(record, ner_answer(("江泽民", "PER"), ("北京", "ORG"), ("上海", "LOC"),
                                                      ("江泽民", "PER")))
    assert row["valid"] and [e["text"] for e in row["gold"]] == ["江泽民", "北京", "李鹏"]
    assert row["missed"] == [{"text": "李鹏", "type": "PER", "start": 8, "end": 10}]
    assert row["wrong_type"] == [{"text": "北京", "start": 4, "end": 6, "gold_type": "LOC", "predicted_type": "ORG"}]
    assert row["spurious"] == [{"text": "上海", "type": "LOC", "start": None, "end": None},   # not in the text
                               {"text": "江泽民", "type": "PER", "start": None, "end": None}]  # listed twice
    assert (row["tp"], row["fp"], row["fn"]) == (1, 3, 2)
    bad = tasks.get("ner").explain(record, "江泽民")
    assert not bad["valid"] and bad["predicted"] == [] and bad["fn"] == 3 and "error" in bad


def test_sentiment_explain():
    record = Record(text="好书", label="positive")
    assert tasks.get("sentiment").explain(record, '{"label": "正面"}') == {
        "valid": True, "gold": "positive", "predicted": "positive", "correct": True}
    wrong = tasks.get("sentiment").explain(record, "no")
    assert wrong["correct"] is False and wrong["predicted"] is None and not wrong["valid"]


@pytest.mark.parametrize("task", ["sentiment", "ner"])
def test_per_example_rows_add_up_to_the_task_metrics(task):
    """What the gate's bootstrap recomputes from the rows equals the evaluation's metrics on all examples,
    and a resample that draws an example twice counts it twice."""
    spec = tasks.get(task)
    records = read_jsonl(DATA / "val.jsonl", task=task)
    rng = random.Random(7)
    answers = [perturbed(r, rng) for r in records]
    metrics = spec.metrics(records, answers)
    rows = json.loads(json.dumps(example_rows(records, answers)))  # as the gate reads them back
    whole = spec.resampled_metrics(rows, np.ones((1, len(rows))))
    for key, value in whole.items():
        assert value[0] == pytest.approx(metrics[key]), key
    doubled = spec.resampled_metrics(rows, np.array([[2] + [1] * (len(rows) - 1)]))
    again = spec.metrics([records[0], *records], [answers[0], *answers])
    for key, value in doubled.items():
        assert value[0] == pytest.approx(again[key]), key


class FakeEngine:
    """Answers from a table, as `Engine.generate` would return them."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def generate(self, records, adapter=None, constrained=True):
        return [self.answers[r.text] for r in records]


def test_eval_writes_one_line_per_example_and_ignores_extra_keys(tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", [
        {"text": TEXT, "entities": [{**e, "confidence": 1.0} for e in GOLD], "sector": "news", "source": "x"},
        {"text": "今天天气好", "entities": [], "sector": "weather", "url": "http://example.org"},
        {"text": "好书", "label": "positive", "sector": "books"},
    ])
    engine = FakeEngine({TEXT: ner_answer(("江泽民", "PER"), ("北京", "ORG"), ("江泽民", "PER")),
                         "今天天气好": ner_answer()})
    said, out = [], tmp_path / "predictions.jsonl"
    metrics = evaluate_file(ModelRef(Path("unused")), data, "ner", engine=engine, predictions=out, log=said.append)
    assert metrics["n"] == 2 and metrics["recall"] == pytest.approx(1 / 3)
    assert said[0] == (f"note: {data}: ignored keys the neutral format does not use: entities[].confidence "
                       "(1 record), sector (3 records), url (1 record)")
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 2 and said[1] == f"predictions: 2 lines in {out}"
    first = lines[0]
    assert first["text"] == TEXT and first["task"] == "ner" and first["answer"].startswith('{"entities"')
    assert [e["text"] for e in first["missed"]] == ["李鹏"] and first["wrong_type"][0]["predicted_type"] == "ORG"
    assert [e["text"] for e in first["spurious"]] == ["江泽民"]
    assert lines[1]["gold"] == [] and lines[1]["predicted"] == [] and lines[1]["fp"] == 0


def test_pipeline_files_stay_strict(tmp_path):
    """Only files a user brings to evaluate may carry keys of their own; the pipeline's splits may not."""
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "好书", "label": "positive", "sector": "books"}])
    with pytest.raises(FormatError, match="sector"):
        read_jsonl(path)
    loaded = read_user_jsonl(path)
    assert loaded.records == [Record(text="好书", label="positive")] and dict(loaded.ignored) == {"sector": 1}
    both = write_jsonl(tmp_path / "both.jsonl", [{"text": "好书", "label": "positive", "sector": "books"},
                                                 {"text": "江泽民", "entities": [], "sector": "news", "url": "u"},
                                                 {"text": "差", "label": "negative"}])
    assert read_user_jsonl(both).extras == [{"sector": "books"}, {"sector": "news", "url": "u"}, {}]
    assert read_user_jsonl(both, task="sentiment").extras == [{"sector": "books"}, {}]  # aligned with the records
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "好书", "label": "so-so", "sector": "books"}])
    with pytest.raises(FormatError, match="bad.jsonl:1: label"):  # the rest is checked as strictly
        read_user_jsonl(bad)
