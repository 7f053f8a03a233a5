"""What every task has: a prompt in one template, a compact JSON answer, its parser, metrics, a
reward, a decoding constraint and the service's result. Two shapes cover the tasks so far:
`ClassificationTask` (a label) and extraction (`lingtune.tasks.ner`).

A training example is two chat messages: the user turn built from TEMPLATE and the assistant turn,
the answer JSON. `encode_example` tokenizes them with the tokenizer's own chat template exactly as SFT
trains on them; evaluation, serving, RL, the reward stage and GPTQ calibration all start from it.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable

from lingtune.errors import ModelError
from lingtune.records import Record

TEMPLATE_VERSION = "v1"
TEMPLATE = "任务：{task_name}\n{instruction}\n文本：{text}"
TEXT_MARKER = "\n文本："
IGNORE = -100
"""Label of the prompt tokens: no loss there."""


def dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


def first_json_object(text: str) -> object | None:
    """The first JSON value that starts at a "{"; tolerates code fences and prose around it."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            return decoder.raw_decode(text, match.start())[0]
        except json.JSONDecodeError:
            continue
    return None


@dataclass
class ParsedAnswer:
    """What a model answered. `valid` is False when the answer does not parse or does not fit
    the task's schema; `error` then says why."""

    task: str
    valid: bool
    label: str | None = None
    entities: list[tuple[str, str]] = field(default_factory=list)
    """(surface text, type) in answer order; empty for classification."""
    error: str | None = None


class Task(ABC):
    """One task: everything that differs between tasks lives in a subclass."""

    name: str
    title: str
    """Task name inside the prompt (Chinese, as trained)."""
    instruction: str
    gold_field: str
    """`label` or `entities`: the Record field holding the gold answer."""
    summary_keys: tuple[str, ...]
    """Metrics `lingtune eval` prints."""
    free_max_tokens: int = 32
    """Answer budget of unconstrained decoding."""

    # -- prompt and answer, exactly as trained ---------------------------------------------------
    def user_prompt(self, text: str) -> str:
        return TEMPLATE.format(task_name=self.title, instruction=self.instruction, text=text)

    def messages(self, record: Record) -> list[dict]:
        return [{"role": "user", "content": self.user_prompt(record.text)},
                {"role": "assistant", "content": self.answer(record)}]

    @abstractmethod
    def answer(self, record: Record) -> str:
        """The answer JSON the model is trained to write for this record."""

    @abstractmethod
    def placeholder(self, text: str) -> Record:
        """A record of this task for `text` with any gold answer (prompts need no gold)."""

    def parse(self, answer: str) -> ParsedAnswer:
        """The first JSON object in the answer (prose and code fences around it are tolerated), read
        by the task's schema; `valid` False with the reason when it does not fit."""
        obj = first_json_object(answer)
        if obj is None:
            return ParsedAnswer(self.name, False, error="no JSON object in the answer")
        if not isinstance(obj, dict):
            return ParsedAnswer(self.name, False, error="answer is not a JSON object")
        return self.read(obj)

    @abstractmethod
    def read(self, obj: dict) -> ParsedAnswer:
        """The answer object by the task's schema."""

    # -- data ---------------------------------------------------------------------------------------
    def check_record(self, record: Record) -> None:
        """Raise ValueError when a record of this task carries the wrong field or values."""
        if getattr(record, self.gold_field) is None:
            other = "entities" if self.gold_field == "label" else "label"
            raise ValueError(f"task is {self.name!r} but the record carries '{other}', not '{self.gold_field}'")

    def align(self, raw: dict) -> dict:
        """Canonical spellings of the gold answer in a raw record (aliases users and corpora use)."""
        return raw

    @abstractmethod
    def stats(self, records: list[Record]) -> dict:
        """Counts for the dataset card beyond totals (labels, entity types)."""

    # -- scoring ------------------------------------------------------------------------------------
    @abstractmethod
    def metrics(self, records: list[Record], answers: list[str]) -> dict:
        """Scores of answers against gold; an answer that does not parse counts as wrong."""

    @abstractmethod
    def explain(self, record: Record, answer: str) -> dict:
        """One example for error analysis (`lingtune eval --predictions`): `valid`, `gold`, `predicted`
        and what went wrong; also everything `resampled_metrics` reads back."""

    @abstractmethod
    def resampled_metrics(self, rows: list[dict], weights) -> dict:
        """The summary metrics of `metrics` for every bootstrap resample of the examples `rows` (their
        `explain` dicts, as read back from JSON); row b of `weights` counts how often each is drawn."""

    @abstractmethod
    def reward(self, record: Record, answer: str, metric: str) -> float:
        """Per-answer reward in [0, 1] (RL); an unparsable answer scores 0."""

    def normalised(self, answer: str) -> Hashable:
        """A value two answers share when they mean the same (generation consistency)."""
        parsed = self.parse(answer)
        return "<invalid>" if not parsed.valid else self.meaning(parsed)

    @abstractmethod
    def meaning(self, parsed: ParsedAnswer) -> Hashable: ...

    @abstractmethod
    def exact_schema(self, obj: object) -> bool:
        """The answer object has exactly the trained keys and canonical values (judge rubric)."""

    # -- decoding and serving -----------------------------------------------------------------------
    @abstractmethod
    def constraint(self) -> dict:
        """vLLM structured-output rule (`{"choice": [...]}` or `{"regex": ...}`) for the trained format."""

    @abstractmethod
    def answer_schema(self) -> dict:
        """JSON Schema of the answer object (what `exact_schema` accepts): for OpenAI structured outputs,
        `response_format={"type": "json_schema", "json_schema": {"name": ..., "schema": ..., "strict": true}}`."""

    def response_format(self) -> dict:
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.answer_schema(), "strict": True}}

    def max_tokens(self, extraction_budget: int) -> int:
        return self.free_max_tokens

    @abstractmethod
    def result(self, text: str, parsed: ParsedAnswer) -> dict:
        """The service's JSON for a parsed answer (label, or entities with offsets)."""


class ClassificationTask(Task):
    """One label out of a fixed set, answered as `{"label": "<label>"}`."""

    gold_field = "label"
    summary_keys = ("accuracy", "macro_f1")
    labels: tuple[str, ...]
    aliases: dict[str, tuple[str, ...]]
    """Canonical label -> spellings users and corpora use (正面, pos, 1, ...)."""

    def canonical(self, value: object) -> str | None:
        spelled = str(value).strip().lower()
        return next((label for label, names in self.aliases.items() if spelled in {n.lower() for n in names}), None)

    def answer(self, record: Record) -> str:
        return dumps({"label": record.label})

    def placeholder(self, text: str) -> Record:
        return Record(text=text, task=self.name, label=self.labels[0])

    def read(self, obj: dict) -> ParsedAnswer:
        label = self.canonical(obj.get("label", ""))
        if label is None:
            return ParsedAnswer(self.name, False, error=f"unknown label {obj.get('label')!r}")
        return ParsedAnswer(self.name, True, label=label)

    def check_record(self, record: Record) -> None:
        super().check_record(record)
        if record.label not in self.labels:
            raise ValueError(f"label {record.label!r} is not one of {list(self.labels)}")

    def align(self, raw: dict) -> dict:
        if "label" in raw and self.canonical(raw["label"]) is not None:
            return {**raw, "label": self.canonical(raw["label"])}
        return raw

    def stats(self, records: list[Record]) -> dict:
        counts = Counter(r.label for r in records)
        return {"labels": {label: counts[label] for label in self.labels}}

    def metrics(self, records: list[Record], answers: list[str]) -> dict:
        from lingtune.tasks.scores import classification_metrics

        return classification_metrics([r.label for r in records], [self.parse(a).label for a in answers], self.labels)

    def explain(self, record: Record, answer: str) -> dict:
        parsed = self.parse(answer)
        row = {"valid": parsed.valid, "gold": record.label, "predicted": parsed.label,
               "correct": parsed.label == record.label}
        return {**row, "error": parsed.error} if parsed.error else row

    def resampled_metrics(self, rows: list[dict], weights) -> dict:
        from lingtune.tasks.scores import classification_resampled

        return classification_resampled([r["gold"] for r in rows], [r["predicted"] for r in rows], self.labels, weights)

    def reward(self, record: Record, answer: str, metric: str) -> float:
        return float(self.parse(answer).label == record.label)

    def meaning(self, parsed: ParsedAnswer) -> Hashable:
        return parsed.label

    def exact_schema(self, obj: object) -> bool:
        return isinstance(obj, dict) and set(obj) == {"label"} and obj["label"] in self.labels

    def choices(self) -> list[str]:
        return [self.answer(Record(text="x", task=self.name, label=label)) for label in self.labels]

    def constraint(self) -> dict:
        return {"choice": self.choices()}

    def answer_schema(self) -> dict:
        return {"type": "object", "properties": {"label": {"type": "string", "enum": list(self.labels)}},
                "required": ["label"], "additionalProperties": False}

    def result(self, text: str, parsed: ParsedAnswer) -> dict:
        return {"label": parsed.label}


# -- encoding with the tokenizer's chat template ------------------------------------------------
@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def prompt_length(self) -> int:
        return next((i for i, label in enumerate(self.labels) if label != IGNORE), len(self.labels))


def encode_example(tokenizer, record: Record) -> Encoded:
    """Prompt and answer tokens of one record, rendered by the tokenizer's own chat template; only the
    answer carries labels. The end-of-turn text after the answer is kept, its trailing newline is not."""
    from lingtune.tasks import get

    full = get(record.task).messages(record)
    user = full[:1]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(full, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ModelError("the chat template renders the prompt differently inside a full conversation")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text) :].rstrip("\n"), add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def prompt_ids(tokenizer, task: Task, text: str) -> list[int]:
    """The prompt of `text` as token ids, exactly as SFT encoded it (one <bos>, from the template)."""
    encoded = encode_example(tokenizer, task.placeholder(text))
    return encoded.input_ids[: encoded.prompt_length]


def answer_ids(tokenizer, record: Record) -> list[int]:
    encoded = encode_example(tokenizer, record)
    return encoded.input_ids[encoded.prompt_length :]
