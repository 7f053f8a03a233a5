"""The neutral task format: what users bring their own data in, and what `lingtune eval` reads.

One JSON object per line:

* sentiment: ``{"text": "...", "label": "positive" | "negative"}``
* NER: ``{"text": "...", "entities": [{"start": 0, "end": 3, "type": "PER", "text": "江泽民"}]}``
  with character offsets into ``text`` (``text[start:end] == entity text``), end exclusive.

Labels and types may be spelled as users and corpora do (正面, pos, 1, PERSON, 人名, ...): one
label-alignment table (LABEL_ALIASES, TYPE_ALIASES) maps them to the canonical ones on read.
Optional keys: ``id``, ``task`` (inferred from ``label``/``entities`` when absent), ``source``.
The processed splits of the prepare stage are files in this format with both tasks mixed.
Conversions both ways: to/from chat messages (the training template, see prompts.py) and,
for NER, to/from character-level BIO lines (CoNLL style: ``char<TAB>tag``, blank line between
sentences).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Task = Literal["sentiment", "ner"]
TASKS: tuple[str, ...] = ("sentiment", "ner")
LABELS: tuple[str, ...] = ("positive", "negative")
ENTITY_TYPES: tuple[str, ...] = ("PER", "LOC", "ORG")


# One label-alignment table: every spelling users and corpora use -> the canonical label.
LABEL_ALIASES = {
    "positive": ("positive", "pos", "1", "+1", "正面", "积极", "正向", "好评"),
    "negative": ("negative", "neg", "0", "-1", "负面", "消极", "负向", "差评"),
}
TYPE_ALIASES = {
    "PER": ("PER", "PERSON", "nr", "人名"),
    "LOC": ("LOC", "LOCATION", "GPE", "ns", "地名"),
    "ORG": ("ORG", "ORGANIZATION", "nt", "机构", "机构名"),
}
_LABELS = {alias.lower(): label for label, aliases in LABEL_ALIASES.items() for alias in aliases}
_TYPES = {alias.lower(): etype for etype, aliases in TYPE_ALIASES.items() for alias in aliases}


def canonical_label(value: object) -> str | None:
    return _LABELS.get(str(value).strip().lower())


def canonical_type(value: object) -> str | None:
    return _TYPES.get(str(value).strip().lower())


def align_labels(raw: object) -> object:
    """Map label and entity-type spellings (正面, pos, 1, PERSON, 人名, ...) to the canonical ones."""
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    if "label" in raw and canonical_label(raw["label"]) is not None:
        raw["label"] = canonical_label(raw["label"])
    if isinstance(raw.get("entities"), list):
        raw["entities"] = [
            {**e, "type": canonical_type(e["type"]) or e["type"]} if isinstance(e, dict) and "type" in e else e
            for e in raw["entities"]
        ]
    return raw


class FormatError(ValueError):
    """A record is not in the neutral format; the message names the file and line."""


class Entity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    type: Literal["PER", "LOC", "ORG"]
    text: str = Field(min_length=1)


class Record(BaseModel):
    """One example of either task in the neutral format."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    text: str = Field(min_length=1)
    task: Task | None = None
    label: Literal["positive", "negative"] | None = None
    entities: tuple[Entity, ...] | None = None
    id: str | None = None
    source: str | None = None

    @model_validator(mode="after")
    def _one_task(self) -> "Record":
        if (self.label is None) == (self.entities is None):
            raise ValueError("a record has exactly one of 'label' (sentiment) or 'entities' (ner)")
        inferred = "sentiment" if self.label is not None else "ner"
        if self.task is not None and self.task != inferred:
            raise ValueError(f"task is {self.task!r} but the record carries {inferred} fields")
        object.__setattr__(self, "task", inferred)
        for entity in self.entities or ():
            check_span(self.text, entity)
        return self


def check_span(text: str, entity: Entity) -> None:
    if not entity.start < entity.end <= len(text):
        raise ValueError(f"span {entity.start}:{entity.end} is outside the text (length {len(text)})")
    if text[entity.start : entity.end] != entity.text:
        raise ValueError(
            f"text[{entity.start}:{entity.end}] is {text[entity.start:entity.end]!r}, not {entity.text!r}"
        )


def parse_record(raw: object, where: str) -> Record:
    try:
        return Record.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors()
        )
        raise FormatError(f"{where}: {problems}") from None


def read_jsonl(path: str | Path, task: str | None = None) -> list[Record]:
    """Read and validate a neutral-format file; with `task`, keep that task's records only."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FormatError(f"{where}: not JSON ({exc.msg})") from None
            record = parse_record(align_labels(raw), where)
            if task is None or record.task == task:
                records.append(record)
    return records


def record_to_json(record: Record) -> dict:
    return record.model_dump(mode="json", exclude_none=True)


def write_jsonl(path: str | Path, records: Iterable[Record]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record_to_json(record), ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)  # never leave a half-written split behind
    return count


def to_bio(record: Record) -> list[tuple[str, str]]:
    """Character-level BIO tags of an NER record."""
    if record.task != "ner":
        raise FormatError("BIO export is for NER records only")
    tags = ["O"] * len(record.text)
    for entity in record.entities or ():
        if any(tag != "O" for tag in tags[entity.start : entity.end]):
            raise FormatError(f"overlapping entities cannot be written as BIO: {entity.text!r}")
        tags[entity.start] = f"B-{entity.type}"
        for i in range(entity.start + 1, entity.end):
            tags[i] = f"I-{entity.type}"
    return list(zip(record.text, tags))


def from_bio(pairs: list[tuple[str, str]], where: str = "<bio>") -> Record:
    """NER record from (character, tag) pairs; an I- tag without its B- starts a new entity."""
    text = "".join(char for char, _ in pairs)
    entities: list[Entity] = []
    start, etype = None, None
    for i, (_, tag) in enumerate([*pairs, ("", "O")]):
        prefix, _, kind = tag.partition("-")
        if tag != "O" and (prefix not in ("B", "I") or kind not in ENTITY_TYPES):
            raise FormatError(f"{where}: unknown tag {tag!r}")
        continues = prefix == "I" and kind == etype
        if start is not None and not continues:
            entities.append(Entity(start=start, end=i, type=etype, text=text[start:i]))
            start, etype = None, None
        if tag != "O" and not continues:
            start, etype = i, kind
    return Record(text=text, entities=tuple(entities))


def read_bio(path: str | Path) -> list[Record]:
    path = Path(path)
    records, pairs = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate([*handle, "\n"], 1):
            if not line.strip():
                if pairs:
                    records.append(from_bio(pairs, f"{path}:{number}"))
                    pairs = []
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or len(parts[0]) != 1:
                raise FormatError(f"{path}:{number}: expected 'character<TAB>tag'")
            pairs.append((parts[0], parts[1]))
    return records


def write_bio(path: str | Path, records: Iterable[Record]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.writelines(f"{char}\t{tag}\n" for char, tag in to_bio(record))
            handle.write("\n")
            count += 1
    return count
