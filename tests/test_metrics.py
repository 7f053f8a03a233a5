"""Task metrics on hand-made cases; NER strict matching checked against a brute-force count."""

import random

import pytest
from sklearn.metrics import f1_score

from lingtune import tasks
from lingtune.evaluate.run import score
from lingtune.records import Entity, Record
from lingtune.tasks.ner import ENTITY_TYPES
from lingtune.tasks.scores import classification_metrics, span_metrics

predicted_spans = tasks.get("ner").predicted_spans


def ner_metrics(gold, predicted):
    return span_metrics(gold, predicted, ENTITY_TYPES)


def sentiment_metrics(gold, predicted):
    return classification_metrics(gold, predicted, ("positive", "negative"))


GOLD = [(0, 3, "PER"), (4, 6, "LOC")]


def test_exact_match_is_a_hit():
    m = ner_metrics([GOLD], [list(GOLD)])
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0)


def test_partial_span_and_wrong_type_are_misses():
    m = ner_metrics([GOLD], [[(0, 2, "PER"), (4, 6, "ORG")]])
    assert (m["precision"], m["recall"]) == (0.0, 0.0)
    assert m["per_type"]["ORG"]["precision"] == 0.0 and m["per_type"]["LOC"]["recall"] == 0.0


def test_empty_prediction_and_empty_gold():
    m = ner_metrics([GOLD, []], [[], []])
    assert (m["precision"], m["recall"], m["f1"], m["support"]) == (0.0, 0.0, 0.0, 2)
    m = ner_metrics([[]], [[(0, 1, "PER")]])
    assert m["precision"] == 0.0 and m["support"] == 0


def test_duplicate_prediction_earns_one_hit():
    m = ner_metrics([GOLD], [[(0, 3, "PER"), (0, 3, "PER")]])
    assert m["precision"] == 0.5 and m["recall"] == 0.5


def test_invalid_answers_count_as_wrong_not_skipped():
    m = ner_metrics([GOLD, GOLD], [list(GOLD), None])
    assert m["recall"] == 0.5 and m["invalid_rate"] == 0.5
    s = sentiment_metrics(["positive", "negative", "negative"], ["positive", None, "negative"])
    assert s["accuracy"] == pytest.approx(2 / 3) and s["invalid_rate"] == pytest.approx(1 / 3)
    assert s["per_class"]["negative"]["recall"] == 0.5
    assert {"actual": "negative", "predicted": "invalid", "count": 1} in s["confusion"]


def test_sentiment_macro_f1_is_sklearns():
    rng = random.Random(0)
    gold = [rng.choice(["positive", "negative"]) for _ in range(200)]
    pred = [rng.choice(["positive", "negative"]) for _ in range(200)]
    assert sentiment_metrics(gold, pred)["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))


def test_ner_micro_scores_match_a_brute_force_count():
    rng = random.Random(1)
    spans = [(s, s + rng.randint(1, 3), rng.choice(["PER", "LOC", "ORG"])) for s in range(0, 60, 4)]
    gold = [rng.sample(spans, 4) for _ in range(30)]
    pred = [rng.sample(spans, 3) for _ in range(30)]
    tp = sum(len(set(g) & set(p)) for g, p in zip(gold, pred))
    m = ner_metrics(gold, pred)
    assert m["precision"] == pytest.approx(tp / 90) and m["recall"] == pytest.approx(tp / 120)


def test_scoring_answers_maps_offsets_and_penalises_unknown_text():
    record = Record(text="江泽民在北京，北京", entities=(Entity(start=0, end=3, type="PER", text="江泽民"),
                                                   Entity(start=4, end=6, type="LOC", text="北京"),
                                                   Entity(start=7, end=9, type="LOC", text="北京")))
    answer = '{"entities": [{"text": "江泽民", "type": "PER"}, {"text": "北京", "type": "LOC"}, {"text": "北京", "type": "LOC"}]}'
    assert score("ner", [record], [answer])["f1"] == 1.0
    assert predicted_spans(record.text, '{"entities": [{"text": "上海", "type": "LOC"}]}') == [(-1, -1, "LOC")]
    assert predicted_spans(record.text, "好的，答案是：江泽民") is None
    m = score("ner", [record], ['前言 {"entities": [{"text": "江泽民", "type": "PER"}]} 结束'])
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(1 / 3)
