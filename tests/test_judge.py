"""Judges: the rubric on hand cases, and the OpenAI judge against a real OpenAI-compatible HTTP server on
localhost (FastAPI + uvicorn, started here) through the real `openai` client: grades, cache, token and
cost accounting, a stall that times out and is retried, and failures that are raised, not swallowed."""

from __future__ import annotations

import time

import pytest
from judge_server import judge_server

from lingtune.config import JudgeConfig
from lingtune.judge import JudgeError, JudgeItem, OpenAIJudge, RubricJudge, parse_grade, rubric_checks, rubric_score

TEXT = "江泽民在北京会见新华社记者。"
KEY = "sk-test-do-not-leak-123"


@pytest.mark.parametrize("task,answer,expected", [
    ("sentiment", '{"label": "positive"}', 1.0),
    ("sentiment", '{"label":"negative"}', 1.0),
    ("sentiment", '好评。{"label": "positive"} 因为它很好', 0.75),      # prose around the JSON
    ("sentiment", '{"label": "正面"}', 0.75),                           # an alias, not the requested spelling
    ("sentiment", '{"label": "positive", "confidence": 0.9}', 0.75),   # an extra key
    ("sentiment", '{"label": "neutral"}', 0.0),                         # not a label of the task
    ("sentiment", "positive", 0.0),                                     # no JSON at all
    ("ner", '{"entities": [{"text": "江泽民", "type": "PER"}, {"text": "北京", "type": "LOC"}]}', 1.0),
    ("ner", '{"entities": []}', 1.0),                                   # form only: recall is another reward
    ("ner", '{"entities": [{"text": "江泽民", "type": "PER"}, {"text": "上海", "type": "LOC"}]}', 0.875),
    ("ner", '{"entities": [{"text": "上海", "type": "LOC"}]}', 0.75),   # names something not in the text
    ("ner", '{"entities": [{"text": "北京", "type": "CITY"}]}', 0.0),   # type outside the set
    ("ner", '```json\n{"entities": [{"text": "北京", "type": "LOC"}]}\n```', 0.75),
    ("ner", '{"entities": "北京"}', 0.0),
])
def test_rubric_hand_cases(task, answer, expected):
    assert rubric_score(task, TEXT, answer) == pytest.approx(expected)


def test_rubric_checks_and_judge():
    assert rubric_checks("ner", TEXT, '{"entities": [{"text": "北京", "type": "LOC"}]} ok') == {
        "parses": 1.0, "only_json": 0.0, "exact_schema": 1.0, "grounded": 1.0}
    judge = RubricJudge()
    scores = judge.score([JudgeItem("sentiment", "好", '{"label": "positive"}'), JudgeItem("ner", TEXT, "?")])
    assert scores == [1.0, 0.0] and judge.stats.items == 2


@pytest.mark.parametrize("reply,grade", [('{"score": 7}', 0.7), ('score: 10', 1.0), ('{"score": 15}', 1.0),
                                         ('{"score": -2}', 0.0), ("I like it", None)])
def test_parse_grade(reply, grade):
    assert parse_grade(reply) == (pytest.approx(grade) if grade is not None else None)


# -- a real OpenAI-compatible server (tests/judge_server.py) ---------------------------------------
@pytest.fixture(scope="module")
def server():
    with judge_server() as running:
        yield running


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("LINGTUNE_TEST_JUDGE_KEY", KEY)
    return "LINGTUNE_TEST_JUDGE_KEY"


def _judge(url, key_env, tmp_path, **kw) -> OpenAIJudge:
    cfg = dict(kind="openai", base_url=url, model="grader", api_key_env=key_env, timeout_s=5, max_retries=2,
               concurrency=3, cache_dir=str(tmp_path / "cache"), usd_per_million_input=1.0, usd_per_million_output=2.0)
    return OpenAIJudge(JudgeConfig(**{**cfg, **kw}))


ITEMS = [JudgeItem("sentiment", f"评论{i}", '{"label": "%s"}' % ("positive" if i % 2 else "negative")) for i in range(6)]


def test_openai_judge_grades_caches_and_counts(server, key_env, tmp_path):
    url, seen = server
    judge = _judge(url, key_env, tmp_path)
    assert judge.score(ITEMS) == [0.2, 0.9] * 3
    stats = judge.stats.as_dict()
    assert stats["requests"] == 6 and stats["cache_hits"] == 0 and stats["prompt_tokens"] == 600
    assert stats["cost_usd"] == pytest.approx((600 * 1.0 + 30 * 2.0) / 1e6)
    assert seen[f"auth:Bearer {KEY}"] >= 6  # the key went to the server ...

    again = _judge(url, key_env, tmp_path)  # a new process would find the same cache
    assert again.score(ITEMS[:2]) == [0.2, 0.9]
    assert again.stats.cache_hits == 2 and again.stats.requests == 0
    cached = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert KEY not in cached and KEY not in str(stats)  # ... and nowhere else


def test_stall_times_out_is_retried_then_reported(server, key_env, tmp_path):
    url, seen = server
    judge = _judge(url, key_env, tmp_path, model="stall", timeout_s=0.5, max_retries=1, concurrency=1)
    started = time.time()
    with pytest.raises(JudgeError, match="APITimeoutError"):
        judge.score(ITEMS[:1])
    assert seen["stall"] == 2 and judge.stats.requests == 2 and judge.stats.errors == 1
    assert time.time() - started < 5


def test_retry_recovers_from_a_transient_error(server, key_env, tmp_path):
    url, seen = server
    judge = _judge(url, key_env, tmp_path, model="flaky", max_retries=2)
    assert judge.score(ITEMS[1:2]) == [0.9]
    assert seen["flaky"] == 2 and judge.stats.requests == 2 and judge.stats.errors == 0


def test_server_failure_is_raised_not_swallowed(server, key_env, tmp_path):
    url, seen = server
    judge = _judge(url, key_env, tmp_path, model="fail", max_retries=1)
    with pytest.raises(JudgeError, match="InternalServerError.*judge backend down"):
        judge.score(ITEMS[:2])
    assert seen["fail"] == 4  # two items, one retry each
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are not cached


def test_unreadable_grade_is_none_and_counted(server, key_env, tmp_path):
    url, _ = server
    judge = _judge(url, key_env, tmp_path, model="prose")
    assert judge.score(ITEMS[:2]) == [None, None] and judge.stats.unparsed == 2


def test_missing_key_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("LINGTUNE_NO_SUCH_KEY", raising=False)
    with pytest.raises(JudgeError, match="LINGTUNE_NO_SUCH_KEY is not set"):
        OpenAIJudge(JudgeConfig(kind="openai", api_key_env="LINGTUNE_NO_SUCH_KEY", cache_dir=str(tmp_path)))
