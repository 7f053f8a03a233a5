"""Free first, then the constraint (lingtune.decoding): an unconstrained answer is kept only when it is
one the constraint allows, whole, and stopped on its own; every other answer is decoded again under the
constraint, offline (Engine.complete) and in the service (serve.tasks._answer, which also stops a first
try as soon as its text can no longer become an allowed answer). The engines here are fakes that answer
by the sampling params they get; tests/test_serve.py and tests/test_pyfunc.py run the same paths on a
real vLLM engine, where the tiny random model's first tries all fail and go through the constraint."""

import asyncio
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

import lingtune.decoding as decoding_module
from lingtune.decoding import TaskDecoder
from lingtune.engine import Engine
from lingtune.serve import tasks as serve_tasks

VALID = '{"entities": [{"text": "江泽民", "type": "PER"}, {"text": "北京", "type": "LOC"}]}'
CONSTRAINED = '{"entities": [{"text": "北京", "type": "LOC"}]}'


@pytest.fixture(scope="module")
def decoder(tiny_model_dir):
    return TaskDecoder(AutoTokenizer.from_pretrained(tiny_model_dir), 48)


def output(text: str, finish: str = "stop") -> SimpleNamespace:
    return SimpleNamespace(text=text, token_ids=list(range(len(text))), finish_reason=finish)


def test_only_multi_token_constrained_answers_get_a_free_first_try(decoder):
    free = decoder.first_try("ner")
    assert free.structured_outputs is None and free.max_tokens == decoder.sampling("ner").max_tokens == 48
    assert decoder.first_try("sentiment") is None  # one step already: nothing to save
    assert decoder.first_try("ner", constrained=False) is None


@pytest.mark.parametrize("text, finish, kept", [
    (VALID, "stop", True),
    ('{"entities": []}', "stop", True),
    (VALID, "length", False),                                      # cut by the budget: not the model's answer
    (VALID + " 以上", "stop", False),                                # text after the answer
    ('{"entities": [{"text": "江泽民", "type": "PERSON"}]}', "stop", False),  # a type outside the grammar
    ('{"entities": [{"text": "江\\"泽民", "type": "PER"}]}', "stop", False),  # a quote inside a name
    ('{"entities": [{"text":"江泽民","type":"PER"}]}', "stop", False),        # other separators
    ("Sure! " + VALID, "stop", False),
])
def test_a_free_answer_is_kept_only_when_the_constraint_allows_all_of_it(decoder, text, finish, kept):
    assert decoder.accepts("ner", output(text, finish)) is kept


@pytest.mark.parametrize("prefix, viable", [
    ('{"entities": [{"text": "江', True), ('{"entities": [', True), ("", True), (VALID, True),
    ("Sure", False), ('{"entities": [{"text": "江泽民", "type": "X', False), (VALID + ",", False),
])
def test_a_first_try_is_stopped_once_its_text_cannot_become_an_allowed_answer(decoder, prefix, viable):
    assert decoder.may_accept("ner", prefix) is viable


def test_a_choice_constraint_is_checked_as_a_whole_label_answer(tiny_model_dir, monkeypatch):
    answers = {"positive": [7, 8], "negative": [7, 8, 9]}  # labels not told apart by one token: choice constraint
    monkeypatch.setattr(decoding_module, "answer_ids", lambda tok, record: answers[record.label])
    decoder = TaskDecoder(AutoTokenizer.from_pretrained(tiny_model_dir), 48)
    assert decoder.first_try("sentiment") is not None
    assert decoder.accepts("sentiment", output('{"label": "negative"}'))
    assert not decoder.accepts("sentiment", output('{"label": "neutral"}'))
    assert not decoder.accepts("sentiment", output('{"label": "negative"}{"label": "positive"}'))


class FakeLLM:
    """vLLM's LLM.generate: free tries answer `free[prompt]`, constrained ones CONSTRAINED; records calls."""

    def __init__(self, free: dict[int, tuple[str, str]]):
        self.free, self.calls = free, []

    def generate(self, prompts, params, lora_request=None, use_tqdm=False):
        constrained = [p.structured_outputs is not None for p in params]
        self.calls.append(([p["prompt_token_ids"][0] for p in prompts], constrained))
        return [SimpleNamespace(outputs=[output(CONSTRAINED) if c else output(*self.free[p["prompt_token_ids"][0]])])
                for p, c in zip(prompts, constrained)]


def fake_engine(decoder, llm) -> Engine:
    engine = Engine.__new__(Engine)  # no vLLM: the flow of complete() around generate()
    engine.llm, engine.decoder, engine.enable_lora, engine._adapters = llm, decoder, False, {}
    engine.first_tries = engine.constrained_again = 0
    return engine


def test_offline_only_rejected_free_answers_are_decoded_again_constrained(decoder):
    llm = FakeLLM({1: (VALID, "stop"), 2: ("Sure! " + VALID, "stop"), 3: (VALID, "length")})
    engine = fake_engine(decoder, llm)
    answers = engine.complete(["ner"] * 3, [{"prompt_token_ids": [i]} for i in (1, 2, 3)])
    assert answers == [VALID, CONSTRAINED, CONSTRAINED]
    assert llm.calls == [([1, 2, 3], [False] * 3), ([2, 3], [True, True])]
    assert (engine.first_tries, engine.constrained_again) == (3, 2)


def test_offline_unconstrained_decoding_has_no_second_pass(decoder):
    llm = FakeLLM({1: ("Sure! " + VALID, "stop")})
    assert fake_engine(decoder, llm).complete(["ner"], [{"prompt_token_ids": [1]}], constrained=False) == \
        ["Sure! " + VALID]
    assert len(llm.calls) == 1


class FakeAsyncEngine:
    """AsyncLLM.generate: streams the answer one character per step (cumulative text, as vLLM's default
    output kind); records how many steps each request ran and whether its stream was closed early."""

    def __init__(self, free_text: str):
        self.free_text, self.requests = free_text, []

    async def generate(self, prompt, params, request_id, lora_request=None):
        text = CONSTRAINED if params.structured_outputs is not None else self.free_text
        record = {"constrained": params.structured_outputs is not None, "steps": 0, "closed_early": True,
                  "aborted_before_the_next_request": False}
        self.requests.append(record)
        try:
            for n in range(1, len(text) + 1):
                record["steps"] = n
                yield SimpleNamespace(outputs=[output(text[:n], "stop" if n == len(text) else None)],
                                      num_cached_tokens=5)
        except GeneratorExit:  # where vLLM's AsyncLLM.generate aborts the request in the engine
            record["aborted_before_the_next_request"] = record is self.requests[-1]
            raise
        record["closed_early"] = False


def serve_answer(decoder, engine) -> tuple:
    return asyncio.run(serve_tasks._answer(engine, decoder, "ner", {"prompt_token_ids": [1, 2, 3]}, None))


def test_the_service_keeps_an_allowed_free_answer_without_the_constraint(decoder):
    engine = FakeAsyncEngine(VALID)
    assert serve_answer(decoder, engine) == (VALID, 3, len(VALID), 5)
    assert [r["constrained"] for r in engine.requests] == [False]


def test_the_service_stops_a_hopeless_first_try_and_answers_constrained(decoder):
    engine = FakeAsyncEngine("Sure! Here are the entities: " + VALID)
    answer, prompt_tokens, completion_tokens, _ = serve_answer(decoder, engine)
    first, second = engine.requests
    assert answer == CONSTRAINED and second["constrained"] and not first["constrained"]
    assert first["closed_early"] and first["steps"] == 1  # "S" can never start an answer: aborted at once
    assert first["aborted_before_the_next_request"]  # the engine stops decoding it, not garbage collection later
    assert completion_tokens == 1 + len(CONSTRAINED)  # usage counts the work of both tries


def test_the_service_decodes_again_when_the_first_try_ends_outside_the_constraint(decoder):
    engine = FakeAsyncEngine('{"entities": []}]')  # allowed until its last character
    answer, _, completion_tokens, _ = serve_answer(decoder, engine)
    assert answer == CONSTRAINED and engine.requests[0]["closed_early"]
    assert completion_tokens == len('{"entities": []}]') + len(CONSTRAINED)
