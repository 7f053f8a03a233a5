"""The neutral task format: what users bring their own data in, and what `lingtune eval` reads.

One JSON object per line:

* sentiment: ``{"text": "...", "label": "positive" | "negative"}``
* NER: ``{"text": "...", "entities": [{"start": 0, "end": 3, "type": "PER", "text": "江泽民"}]}``
  with character offsets into ``text`` (``text[start:end] == entity text``), end exclusive.

Labels and types may be spelled as users and corpora do (正面, pos, 1, PERSON, 人名, ...): each task's
alias table (lingtune.tasks) maps them to the canonical ones on read; the task then checks the values.
Optional keys: ``id``, ``task`` (inferred from ``label``/``entities`` when absent), ``source``.
The processed splits of the prepare stage are files in this format with both tasks mixed.

`read_jsonl` refuses any other key: the pipeline's own files must hold exactly this format (a typo
would otherwise vanish). A user's file to evaluate often carries columns of its own (`sector`, `url`):
`read_user_jsonl` drops those and says which it dropped.
Conversions both ways: to/from chat messages (the training template, lingtune.tasks) and,
for NER, to/from character-level BIO lines (CoNLL style: ``char<TAB>tag``, blank line between
sentences).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pydantic import ValidationError

from lingtune import tasks
from lingtune.artifacts import write_text
from lingtune.errors import FormatError
from lingtune.records import TASK_OF_FIELD, Entity, Record, record_to_json
from lingtune.tasks.ner import ENTITY_TYPES


def align_labels(raw: object) -> object:
    """Map label and entity-type spellings (正面, pos, 1, PERSON, 人名, ...) to the canonical ones."""
    if not isinstance(raw, dict):
        return raw
    names = [raw["task"]] if raw.get("task") in tasks.TASKS else [t for f, t in TASK_OF_FIELD.items() if f in raw]
    for name in names:
        raw = tasks.get(name).align(raw)
    return raw


def parse_record(raw: object, where: str) -> Record:
    try:
        record = Record.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors()
        )
        raise FormatError(f"{where}: {problems}") from None
    if record.task not in tasks.TASKS:
        raise FormatError(f"{where}: task: unknown task {record.task!r} (lingtune knows {', '.join(tasks.TASKS)})")
    try:
        tasks.get(record.task).check_record(record)
    except ValueError as exc:
        raise FormatError(f"{where}: {exc}") from None
    return record


def numbered_lines(path: str | Path) -> Iterator[tuple[str, str]]:
    """(`file:line`, text) of every non-blank line of a UTF-8 file; FormatError when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield f"{path}:{number}", line


RECORD_KEYS = frozenset(Record.model_fields)
ENTITY_KEYS = frozenset(Entity.model_fields)


@dataclass
class UserFile:
    records: list[Record]
    ignored: Counter = field(default_factory=Counter)
    """Key -> records that carried it, for keys the neutral format does not define (`entities[].x`
    for a key inside an entity)."""
    extras: list[dict] = field(default_factory=list)
    """Each record's top-level keys the format does not define, with their values, in the order of
    `records` (a `sector` column to break scores down by)."""


def drop_unknown_keys(raw: object, ignored: Counter) -> object:
    """`raw` without the keys the neutral format does not define, each counted once per record in `ignored`."""
    if not isinstance(raw, dict):
        return raw
    extra = set(raw) - RECORD_KEYS
    kept = {k: v for k, v in raw.items() if k in RECORD_KEYS}
    if isinstance(kept.get("entities"), list):
        extra |= {f"entities[].{k}" for e in kept["entities"] if isinstance(e, dict) for k in set(e) - ENTITY_KEYS}
        kept["entities"] = [{k: v for k, v in e.items() if k in ENTITY_KEYS} if isinstance(e, dict) else e
                            for e in kept["entities"]]
    ignored.update(extra)
    return kept


def _read(path: str | Path, task: str | None, ignored: Counter | None) -> tuple[list[Record], list[dict]]:
    """The records (of `task`) and each one's keys beyond the format; with `ignored` None, such a key is an error."""
    records, extras = [], []
    for where, line in numbered_lines(path):
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{where}: not JSON ({exc.msg})") from None
        extra = {k: v for k, v in raw.items() if k not in RECORD_KEYS} if isinstance(raw, dict) else {}
        if ignored is not None:
            raw = drop_unknown_keys(raw, ignored)
        record = parse_record(align_labels(raw), where)
        if task is None or record.task == task:
            records.append(record)
            extras.append(extra)
    return records, extras


def read_jsonl(path: str | Path, task: str | None = None) -> list[Record]:
    """Read and validate a neutral-format file, strictly (an unknown key is an error); with `task`, keep
    that task's records only."""
    return _read(path, task, None)[0]


def read_user_jsonl(path: str | Path, task: str | None = None) -> UserFile:
    """`read_jsonl` for a file a user brings to evaluate: keys the format does not define are dropped and
    counted, not refused; everything else is checked as strictly."""
    ignored: Counter = Counter()
    records, extras = _read(path, task, ignored)
    return UserFile(records, ignored, extras)


def describe_ignored(path: str | Path, ignored: Counter) -> str | None:
    """One line naming the dropped keys and how many records carried each; None when there were none."""
    if not ignored:
        return None
    keys = ", ".join(f"{key} ({count} record{'s' if count > 1 else ''})" for key, count in sorted(ignored.items()))
    return f"{path}: ignored keys the neutral format does not use: {keys}"


def evaluation_records(path: str | Path, max_examples: int = 0) -> dict[str, list[Record]]:
    """What `evaluate` scores: per task, its first `max_examples` records of the split (0 = all). The
    register stage logs the same rows as the versions' evaluation dataset."""
    return {task: read_jsonl(path, task=task)[: max_examples or None] for task in tasks.TASKS}


def write_jsonl(path: str | Path, records: Iterable[Record]) -> int:
    """Write a neutral-format file atomically (never a half-written split)."""
    lines = [json.dumps(record_to_json(r), ensure_ascii=False) + "\n" for r in records]
    write_text(path, "".join(lines))
    return len(lines)


def to_bio(record: Record) -> list[tuple[str, str]]:
    """Character-level BIO tags of an NER record."""
    if record.entities is None:
        raise FormatError("BIO export is for NER records (with entities) only")
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
