"""benchmarks/rl_reward.py: what it counts beside `lingtune compare`'s leads (the leads are the gate's code,
tested in test_gate.py; the RL and eval runs are the stages', tested in test_rl.py and test_eval_cli.py)."""

import json
import sys

import pytest

from conftest import ROOT
from lingtune.records import Record

sys.path.insert(0, str(ROOT / "benchmarks"))
import rl_reward as bench  # noqa: E402

GOLD = {"n1": Record(id="n1", task="ner", text="李鹏在中南海会见了江主席。江", entities=(
    {"text": "李鹏", "type": "PER", "start": 0, "end": 2}, {"text": "中南海", "type": "LOC", "start": 3, "end": 6},
    {"text": "江", "type": "PER", "start": 9, "end": 10}, {"text": "江", "type": "PER", "start": 13, "end": 14}))}


def answer(*entities: tuple[str, str]) -> str:
    return json.dumps({"entities": [{"text": t, "type": k} for t, k in entities]}, ensure_ascii=False)


@pytest.mark.parametrize("entities, count", [
    ((("李鹏", "PER"), ("中南海", "LOC")), 0),
    ((("李鹏", "PER"), ("中南海", "LOC"), ("中南海", "LOC")), 1),  # listed twice, in the text once
    ((("江", "PER"), ("江", "PER")), 0),  # twice in the text: both have a place
    ((("江", "PER"), ("江", "PER"), ("江", "PER")), 1),
    ((("北京", "LOC"),), 1),  # not in the text at all
])
def test_entities_without_a_place_in_the_sentence(entities, count):
    rows = [{"task": "ner", "id": "n1", "answer": answer(*entities)},
            {"task": "sentiment", "id": "s1", "answer": '{"label": "positive"}'}]
    assert bench.entities_not_in_text(rows, GOLD) == count


def test_changed_answers_count_ner_rows_only():
    sft = [{"task": "ner", "id": "n1", "answer": answer(("李鹏", "PER"))},
           {"task": "sentiment", "id": "s1", "answer": '{"label": "positive"}'}]
    rl = [{"task": "ner", "id": "n1", "answer": answer(("李鹏", "PER"), ("中南海", "LOC"))},
          {"task": "sentiment", "id": "s1", "answer": '{"label": "negative"}'}]
    assert bench.changed_ner_answers(sft, sft) == 0
    assert bench.changed_ner_answers(sft, rl) == 1
