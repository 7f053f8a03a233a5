"""TaskDecoder: the engine sees the prompt tokens SFT trained on, and one-step sentiment answers
exactly what the trained answer format says."""

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

import lingtune.decoding as decoding_module
from lingtune import tasks
from lingtune.decoding import TaskDecoder
from lingtune.records import Record
from lingtune.tasks.base import IGNORE, encode_example
from lingtune.tasks.ner import ANSWER_REGEX

SENTIMENT = tasks.get("sentiment")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("record", [Record(text="这本书很好看", label="negative"), Record(text="江泽民在北京", entities=())])
def test_prompt_is_the_trained_prompt_with_one_bos(tokenizer, record):
    trained = encode_example(tokenizer, record)
    prompt_len = trained.labels.index(next(label for label in trained.labels if label != IGNORE))
    ids = TaskDecoder(tokenizer, 64).prompt(record.task, record.text, constrained=False)["prompt_token_ids"]
    assert ids == trained.input_ids[:prompt_len]
    assert ids.count(tokenizer.bos_token_id) == 1  # a text prompt would get a second one from vLLM


@pytest.mark.parametrize("label", ["positive", "negative"])
def test_one_step_sentiment_continues_the_trained_answer(tokenizer, label):
    decoder = TaskDecoder(tokenizer, 64)
    record = Record(text="还行吧", label=label)
    trained = encode_example(tokenizer, record)
    prompt = decoder.prompt("sentiment", record.text)["prompt_token_ids"]
    deciding = trained.input_ids[len(prompt)]
    assert trained.input_ids[: len(prompt)] == prompt  # prompt + answer prefix, as trained
    assert decoder.label_steps["sentiment"].labels[deciding] == label
    assert decoder.sampling("sentiment").max_tokens == 1
    assert sorted(decoder.sampling("sentiment").allowed_token_ids) == sorted(decoder.label_steps["sentiment"].labels)
    answer = decoder.answer("sentiment", SimpleNamespace(token_ids=[deciding], text=tokenizer.decode([deciding])))
    assert answer == SENTIMENT.answer(record) and SENTIMENT.parse(answer).label == label


def test_labels_not_told_apart_by_one_token_fall_back_to_the_choice_constraint(tokenizer, monkeypatch):
    answers = {"positive": [7, 8], "negative": [7, 8, 9]}  # one label's tokens a prefix of the other's
    monkeypatch.setattr(decoding_module, "answer_ids", lambda tok, record: answers[record.label])
    decoder = TaskDecoder(tokenizer, 64)
    assert decoder.label_steps["sentiment"] is None
    params = decoder.sampling("sentiment")
    assert params.max_tokens > 1 and params.structured_outputs.choice == ['{"label": "positive"}', '{"label": "negative"}']
    assert decoder.answer("sentiment", SimpleNamespace(token_ids=[5], text='{"label": "negative"}')) == \
        '{"label": "negative"}'


def test_unconstrained_and_ner_decode_the_whole_answer(tokenizer):
    decoder = TaskDecoder(tokenizer, 48)
    assert decoder.sampling("sentiment", constrained=False).allowed_token_ids is None
    ner = decoder.sampling("ner")
    assert ner.max_tokens == 48 and ner.structured_outputs.regex == ANSWER_REGEX
    output = SimpleNamespace(token_ids=[3, 4], text='{"entities": []}')
    assert decoder.answer("ner", output) == '{"entities": []}'


@pytest.mark.parametrize("name", tasks.names())
def test_answer_schema_accepts_exactly_the_trained_answers(name):
    """The JSON Schema users send as response_format describes the trained answer format."""
    import json
    from pathlib import Path

    import jsonschema

    from lingtune.formats import read_jsonl

    spec = tasks.get(name)
    schema = spec.answer_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    records = read_jsonl(Path(__file__).parent / "data" / "train.jsonl", name)
    assert records
    for record in records[:200]:
        answer = json.loads(spec.answer(record))
        jsonschema.validate(answer, schema)
        assert spec.exact_schema(answer)
    wrong = [{"label": "neutral"}, {"label": "positive", "why": "x"}, {"entities": [{"text": "北京", "type": "GPE"}]},
             {"entities": [{"text": "北京", "type": "LOC", "start": 0}]}, {}]
    for obj in wrong:
        assert not jsonschema.Draft202012Validator(schema).is_valid(obj) and not spec.exact_schema(obj), obj
