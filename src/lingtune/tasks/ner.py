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


MICRO_FP_COST = 0.7
"""A spurious entity's cost in the `micro` reward, as a share of a missed one's (see NerTask.reward)."""


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


def compare_spans(gold: list[SpanKey], predicted: list[SpanKey]) -> tuple[Counter, Counter, Counter, list]:
    """Strict matching as the metrics count it (multisets): hits, gold spans missed, predicted spans
    that match nothing, and, taken out of the last two, (gold, predicted) pairs at the same characters
    that differ only in type (each still counts as one miss and one false positive)."""
    g, p = Counter(gold), Counter(predicted)
    hits = g & p
    missed, spurious = g - hits, p - hits
    wrong_type = []
    for span in sorted(spurious.elements()):
        same_place = next((s for s in sorted(missed) if s[:2] == span[:2] and missed[s] > 0), None)
        if same_place is not None:
            wrong_type.append((same_place, span))
            missed[same_place] -= 1
            spurious[span] -= 1
    return hits, +missed, +spurious, wrong_type


def _entity(text: str, span: SpanKey) -> dict:
    start, end, etype = span
    return {"text": text[start:end], "type": etype, "start": start, "end": end}


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

    def explain(self, record: Record, answer: str) -> dict:
        """Gold and predicted entities with offsets, and which were `missed`, `spurious` (an entity whose
        text is not in the input, or not at that place, has no offsets) or of the `wrong_type`; `tp`,
        `fp`, `fn` as the strict metrics count them (an invalid answer predicts nothing)."""
        parsed = self.parse(answer)
        text = record.text
        located, unlocated = locate_entities(text, parsed.entities)
        gold = self.gold_spans(record)
        hits, missed, spurious, wrong = compare_spans(gold, [(e.start, e.end, e.type) for e in located])
        nowhere = [{"text": t, "type": k, "start": None, "end": None} for t, k in unlocated]
        row = {"valid": parsed.valid, "gold": [_entity(text, s) for s in gold],
               "predicted": [_entity(text, (e.start, e.end, e.type)) for e in located] + nowhere,
               "missed": [_entity(text, s) for s in sorted(missed.elements())],
               "spurious": [_entity(text, s) for s in sorted(spurious.elements())] + nowhere,
               "wrong_type": [{"text": text[g[0]:g[1]], "start": g[0], "end": g[1], "gold_type": g[2],
                               "predicted_type": p[2]} for g, p in wrong],
               "tp": sum(hits.values()), "fp": sum(spurious.values()) + len(wrong) + len(unlocated),
               "fn": sum(missed.values()) + len(wrong)}
        return {**row, "error": parsed.error} if parsed.error else row

    def resampled_metrics(self, rows: list[dict], weights) -> dict:
        from lingtune.tasks.scores import span_resampled

        return span_resampled([r["tp"] for r in rows], [r["fp"] for r in rows], [r["fn"] for r in rows],
                              [not r["valid"] for r in rows], weights)

    def reward(self, record: Record, answer: str, metric: str) -> float:
        """The NER reward of one answer; an answer that does not parse scores 0.

        `f1`: strict span-and-type F1 of the answer, so precision counts: an entity listed twice or a span
        that is not in the text lowers it (a recall-only reward paid RL for listing names two or three
        times). A sentence without gold entities scores 1 for an empty answer, else 0. Per answer, F1 still
        leans to recall on the many one-entity sentences: a spurious entity costs 1/3 of the reward there,
        a miss all of it.
        `micro`: 1 - (missed + MICRO_FP_COST x spurious) / (gold + 1), clipped at 0, where a wrong type is
        one of each as in the metrics. Within a prompt (all RLOO compares) a miss and a spurious entity
        cost what they cost the corpus micro-F1 the evaluation reports: its change per answer is
        proportional to d(tp) - F1/2 d(predicted), so a spurious entity costs F1 / (2 - F1) of a miss,
        0.7 at F1 ~0.82."""
        if metric not in ("f1", "micro"):
            raise ValueError(f"unknown NER reward metric {metric!r} (lingtune has f1, micro)")
        row = self.explain(record, answer)
        if not row["valid"]:
            return 0.0
        if metric == "micro":
            return max(0.0, 1.0 - (row["fn"] + MICRO_FP_COST * row["fp"]) / (len(row["gold"]) + 1))
        if not row["gold"]:
            return float(not row["predicted"])
        return 2 * row["tp"] / (2 * row["tp"] + row["fp"] + row["fn"])

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
