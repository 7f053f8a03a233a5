"""One prompt template and one label scheme for both tasks, and the parsing of answers.

A training example is two chat messages: the user turn built from TEMPLATE, and the
assistant turn, a compact JSON object:

* sentiment: ``{"label": "positive"}``
* NER: ``{"entities": [{"text": "江泽民", "type": "PER"}, ...]}`` in order of appearance, one item
  per occurrence (a name mentioned twice is listed twice).

Answers carry no offsets (small models copy text far better than they count characters).
`locate_entities` maps them back to character spans with one deterministic rule: each answer
entity takes the first occurrence of its text at or after the end of the previous located
entity; if there is none, the first occurrence anywhere that no other entity has taken; an
entity that cannot be placed is reported as unlocated (and counts as a wrong answer in eval).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from lingtune.data.formats import Entity, Record, canonical_label, canonical_type

TEMPLATE_VERSION = "v1"
TEMPLATE = "任务：{task_name}\n{instruction}\n文本：{text}"
_TEXT_MARKER = "\n文本："

INSTRUCTIONS = {
    "sentiment": (
        "情感分类",
        '判断这条评论的情感倾向。只输出 JSON：{"label": "positive"} 或 {"label": "negative"}。',
    ),
    "ner": (
        "命名实体识别",
        "按出现顺序找出文本中的人名(PER)、地名(LOC)和机构名(ORG)。"
        '只输出 JSON：{"entities": [{"text": "实体原文", "type": "PER"}]}，没有实体时输出 {"entities": []}。',
    ),
}

def user_prompt(task: str, text: str) -> str:
    task_name, instruction = INSTRUCTIONS[task]
    return TEMPLATE.format(task_name=task_name, instruction=instruction, text=text)


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


def answer_json(record: Record) -> str:
    if record.task == "sentiment":
        return _dumps({"label": record.label})
    ordered = sorted(record.entities or (), key=lambda e: (e.start, e.end))
    return _dumps({"entities": [{"text": e.text, "type": e.type} for e in ordered]})


def to_messages(record: Record) -> list[dict]:
    return [
        {"role": "user", "content": user_prompt(record.task, record.text)},
        {"role": "assistant", "content": answer_json(record)},
    ]


@dataclass
class ParsedAnswer:
    """What a model answered. `valid` is False when the answer does not parse or does not fit
    the task's schema; `error` then says why."""

    task: str
    valid: bool
    label: str | None = None
    entities: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None


def _first_json_object(text: str) -> object:
    """The first JSON object in `text`; tolerates code fences and prose around it."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
            return obj
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON object in the answer")


def parse_answer(task: str, answer: str) -> ParsedAnswer:
    try:
        obj = _first_json_object(answer)
    except ValueError as exc:
        return ParsedAnswer(task, False, error=str(exc))
    if not isinstance(obj, dict):
        return ParsedAnswer(task, False, error="answer is not a JSON object")
    if task == "sentiment":
        label = canonical_label(obj.get("label", ""))
        if label is None:
            return ParsedAnswer(task, False, error=f"unknown label {obj.get('label')!r}")
        return ParsedAnswer(task, True, label=label)
    items = obj.get("entities")
    if not isinstance(items, list):
        return ParsedAnswer(task, False, error="'entities' is not a list")
    entities = []
    for item in items:
        etype = canonical_type(item.get("type", "")) if isinstance(item, dict) else None
        text = item.get("text") if isinstance(item, dict) else None
        if etype is None or not isinstance(text, str) or not text:
            return ParsedAnswer(task, False, error=f"bad entity {item!r}")
        entities.append((text, etype))
    return ParsedAnswer(task, True, entities=entities)


def locate_entities(text: str, entities: list[tuple[str, str]]) -> tuple[list[Entity], list[tuple[str, str]]]:
    """Character spans for answer entities (rule in the module docstring) and those not found."""
    located: list[Entity] = []
    unlocated: list[tuple[str, str]] = []
    taken: set[int] = set()
    cursor = 0
    for surface, etype in entities:
        start = text.find(surface, cursor)
        if start < 0:
            start = next(
                (m.start() for m in re.finditer(re.escape(surface), text) if m.start() not in taken), -1
            )
        if start < 0:
            unlocated.append((surface, etype))
            continue
        taken.add(start)
        cursor = start + len(surface)
        located.append(Entity(start=start, end=start + len(surface), type=etype, text=surface))
    return located, unlocated


def from_messages(messages: list[dict]) -> Record:
    """Neutral record from a user/assistant pair written with this template."""
    roles = [m.get("role") for m in messages]
    if roles != ["user", "assistant"]:
        raise ValueError(f"expected a user and an assistant message, got roles {roles}")
    prompt, answer = messages[0]["content"], messages[1]["content"]
    task = next((t for t, (name, _) in INSTRUCTIONS.items() if prompt.startswith(f"任务：{name}\n")), None)
    if task is None or _TEXT_MARKER not in prompt:
        raise ValueError("the user message was not written with lingtune's template")
    text = prompt.split(_TEXT_MARKER, 1)[1]
    parsed = parse_answer(task, answer)
    if not parsed.valid:
        raise ValueError(f"the assistant message does not parse: {parsed.error}")
    if task == "sentiment":
        return Record(text=text, label=parsed.label)
    located, unlocated = locate_entities(text, parsed.entities)
    if unlocated:
        raise ValueError(f"entities not in the text: {unlocated}")
    return Record(text=text, entities=tuple(located))


