"""Named entities (PER, LOC, ORG) of a Chinese sentence.

The answer is `{"entities": [{"text": "江泽民", "type": "PER"}, ...]}` in order of appearance, one item
per occurrence (a name mentioned twice is listed twice), without offsets: small models copy text far
better than they count characters. `locate_entities` maps answers back to character spans with one
deterministic rule: each answer entity takes the first occurrence of its text at or after the end of
the previous located entity; if there is none, the first occurrence anywhere that no other entity has
taken; an entity that cannot be placed is reported as unlocated (and counts as a wrong answer in eval).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Hashable

from lingtune.records import Entity, Record
from lingtune.tasks.base import ParsedAnswer, Task, dumps
from lingtune.tasks.scores import SpanKey, span_metrics

ENTITY_TYPES: tuple[str, ...] = ("PER", "LOC", "ORG")
TYPE_ALIASES = {
    "PER": ("PER", "PERSON", "nr", "人名"),
    "LOC": ("LOC", "LOCATION", "GPE", "ns", "地名"),
    "ORG": ("ORG", "ORGANIZATION", "nt", "机构", "机构名"),
}
_TYPES = {alias.lower(): etype for etype, aliases in TYPE_ALIASES.items() for alias in aliases}
_ENTITY = r'\{"text": "[^"\\\n]{1,40}", "type": "(PER|LOC|ORG)"\}'
ANSWER_REGEX = r'\{"entities": \[(' + _ENTITY + r'(, ' + _ENTITY + r'){0,40})?\]\}'
"""The trained answer format with its separators, no free whitespace (a model that has not learned
the format would otherwise pad the JSON with spaces until max_tokens)."""


def canonical_type(value: object) -> str | None:
    return _TYPES.get(str(value).strip().lower())


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


class Ner(Task):
    name = "ner"
    title = "命名实体识别"
    instruction = ("按出现顺序找出文本中的人名(PER)、地名(LOC)和机构名(ORG)。"
                   '只输出 JSON：{"entities": [{"text": "实体原文", "type": "PER"}]}，没有实体时输出 {"entities": []}。')
    gold_field = "entities"
    summary_keys = ("precision", "recall", "f1")
    types = ENTITY_TYPES

    def answer(self, record: Record) -> str:
        ordered = sorted(record.entities or (), key=lambda e: (e.start, e.end))
        return dumps({"entities": [{"text": e.text, "type": e.type} for e in ordered]})

    def placeholder(self, text: str) -> Record:
        return Record(text=text, task=self.name, entities=())

    def read(self, obj: dict) -> ParsedAnswer:
        items = obj.get("entities")
        if not isinstance(items, list):
            return ParsedAnswer(self.name, False, error="'entities' is not a list")
        entities = []
        for item in items:
            etype = canonical_type(item.get("type", "")) if isinstance(item, dict) else None
            text = item.get("text") if isinstance(item, dict) else None
            if etype is None or not isinstance(text, str) or not text:
                return ParsedAnswer(self.name, False, error=f"bad entity {item!r}")
            entities.append((text, etype))
        return ParsedAnswer(self.name, True, entities=entities)

    # -- data ---------------------------------------------------------------------------------------
    def check_record(self, record: Record) -> None:
        super().check_record(record)
        bad = [e.type for e in record.entities if e.type not in self.types]
        if bad:
            raise ValueError(f"entity type {bad[0]!r} is not one of {list(self.types)}")

    def align(self, raw: dict) -> dict:
        if not isinstance(raw.get("entities"), list):
            return raw
        return {**raw, "entities": [
            {**e, "type": canonical_type(e["type"]) or e["type"]} if isinstance(e, dict) and "type" in e else e
            for e in raw["entities"]]}

    def stats(self, records: list[Record]) -> dict:
        types = Counter(e.type for r in records for e in r.entities)
        return {"entities": {etype: types[etype] for etype in self.types},
                "sentences_without_entities": sum(1 for r in records if not r.entities)}

    # -- scoring ------------------------------------------------------------------------------------
    def predicted_spans(self, text: str, answer: str) -> list[SpanKey] | None:
        """Spans of an answer; None if it does not parse. An entity whose text is not in the input
        stays a prediction that can never match (a false positive)."""
        parsed = self.parse(answer)
        if not parsed.valid:
            return None
        located, unlocated = locate_entities(text, parsed.entities)
        return [(e.start, e.end, e.type) for e in located] + [(-1 - k, -1, t) for k, (_, t) in enumerate(unlocated)]

    @staticmethod
    def gold_spans(record: Record) -> list[SpanKey]:
        return [(e.start, e.end, e.type) for e in record.entities or ()]

    def metrics(self, records: list[Record], answers: list[str]) -> dict:
        return span_metrics([self.gold_spans(r) for r in records],
                            [self.predicted_spans(r.text, a) for r, a in zip(records, answers)], self.types)

    def reward(self, record: Record, answer: str, metric: str) -> float:
        """Strict span-and-type recall (or F1) of one answer; a sentence without gold entities scores
        1 for an empty answer, else 0."""
        parsed = self.parse(answer)
        if not parsed.valid:
            return 0.0
        gold = Counter(self.gold_spans(record))
        if not gold:
            return float(not parsed.entities)
        located, unlocated = locate_entities(record.text, parsed.entities)
        predicted = Counter((e.start, e.end, e.type) for e in located)
        hits = sum((gold & predicted).values())
        recall = hits / sum(gold.values())
        if metric == "recall":
            return recall
        n_pred = sum(predicted.values()) + len(unlocated)
        precision = hits / n_pred if n_pred else 0.0
        return 2 * precision * recall / (precision + recall) if precision + recall else 0.0

    def meaning(self, parsed: ParsedAnswer) -> Hashable:
        return tuple(parsed.entities)

    def exact_schema(self, obj: object) -> bool:
        items = obj.get("entities") if isinstance(obj, dict) else None
        return (isinstance(obj, dict) and set(obj) == {"entities"} and isinstance(items, list)
                and all(isinstance(e, dict) and set(e) == {"text", "type"} and e["type"] in self.types for e in items))

    # -- decoding and serving -----------------------------------------------------------------------
    def constraint(self) -> dict:
        return {"regex": ANSWER_REGEX}

    def answer_schema(self) -> dict:
        entity = {"type": "object", "properties": {"text": {"type": "string", "minLength": 1},
                                                   "type": {"type": "string", "enum": list(self.types)}},
                  "required": ["text", "type"], "additionalProperties": False}
        return {"type": "object", "properties": {"entities": {"type": "array", "items": entity}},
                "required": ["entities"], "additionalProperties": False}

    def max_tokens(self, extraction_budget: int) -> int:
        return extraction_budget

    def result(self, text: str, parsed: ParsedAnswer) -> dict:
        located, unlocated = locate_entities(text, parsed.entities)
        return {"entities": [e.model_dump() for e in located],
                "unlocated": [{"text": t, "type": k} for t, k in unlocated]}
