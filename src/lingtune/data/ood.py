"""Stage `ood`: the out-of-domain evaluation set, built from the team's annotated source listing.

The source (`ood.source`, in git) is a text file of sections; docs/data.md#out-of-domain-set has the
annotation rules:

    [sentiment bank]                 the task and sector of the lines below
    + 柜员讲得明明白白，二十分钟就办完了。   a positive text (`-` for a negative one)
    [ner bank_notice]
    {招商银行|ORG}提醒您按时还款。        an NER sentence; `{text|TYPE}` marks an entity

Offsets are computed here from the marks, never typed. The build fails naming `file:line` for a mark
that does not parse, an unknown type, a marked name that also occurs unmarked (in its own sentence or in
another NER sentence: almost always a forgotten mark), a text that appears twice, and any text that the
training split contains or shares at least half of its character 8-grams with (lingtune.data.overlap).

The output (`ood.out`, a DVC output) is the neutral format plus a `sector` key, which the evaluate stage
reads with the user-file reader on purpose; `ood.card` counts the set and records the overlap check.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lingtune.artifacts import write_json, write_jsonl
from lingtune.data.dedupe import text_key
from lingtune.data.overlap import overlap_report
from lingtune.errors import DataError
from lingtune.formats import parse_record, read_jsonl
from lingtune.records import Entity, Record, record_to_json
from lingtune.tasks.ner import ENTITY_TYPES

SECTION = re.compile(r"\[(sentiment|ner) ([a-z_]+)\]")
MARK = re.compile(r"\{([^{}|]+)\|([^{}|]+)\}")
LABELS = {"+": "positive", "-": "negative"}


class OodSourceError(DataError):
    """The source listing does not parse or breaks an annotation rule; the message names `file:line`."""


@dataclass(frozen=True)
class OodExample:
    record: Record
    sector: str
    where: str
    """`file:line` of the source line."""

    def as_json(self) -> dict:
        return {**record_to_json(self.record), "sector": self.sector}


def parse_marked(line: str, where: str) -> tuple[str, tuple[Entity, ...]]:
    """The plain text of a marked line and its entities, offsets counted in the plain text."""
    text, entities, last = "", [], 0
    for mark in MARK.finditer(line):
        text += line[last : mark.start()]
        name, etype = mark.group(1), mark.group(2)
        if etype not in ENTITY_TYPES:
            raise OodSourceError(f"{where}: {{{name}|{etype}}}: type must be one of {', '.join(ENTITY_TYPES)}")
        if name != name.strip():
            raise OodSourceError(f"{where}: {{{name}|{etype}}}: spaces around the name")
        entities.append(Entity(start=len(text), end=len(text) + len(name), type=etype, text=name))
        text += name
        last = mark.end()
    text += line[last:]
    if any(c in text for c in "{}|"):  # what is left of a mark that did not match
        raise OodSourceError(f"{where}: a mark that does not parse (write {{name|TYPE}}): {line}")
    return text, tuple(entities)


def unmarked_mentions(text: str, names: set[str], entities: tuple[Entity, ...]) -> list[str]:
    """Names that occur in `text` outside every entity span (a mention left unmarked)."""
    covered = {i for e in entities for i in range(e.start, e.end)}
    return sorted(name for name in names for m in re.finditer(re.escape(name), text)
                  if not covered & set(range(m.start(), m.end())))


def read_source(path: str | Path) -> list[OodExample]:
    """Every example of the source listing, NFKC-normalised as the prepare stage normalises the corpora, with
    an id in file order and the `file:line` it came from as its `source`."""
    path, task, sector, examples = Path(path), None, None, []
    if not path.is_file():
        raise OodSourceError(f"{path}: no such file")
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line, where = unicodedata.normalize("NFKC", raw).strip(), f"{path}:{number}"
        if not line or line.startswith("#"):
            continue
        if section := SECTION.fullmatch(line):
            task, sector = section.groups()
            continue
        if task is None:
            raise OodSourceError(f"{where}: a text before the first [task sector] line")
        examples.append(OodExample(_record(task, line, where, f"ood-{len(examples) + 1:04d}"), sector, where))
    return examples


def _record(task: str, line: str, where: str, record_id: str) -> Record:
    if task == "sentiment":
        sign, _, text = line.partition(" ")
        if sign not in LABELS or not text.strip():
            raise OodSourceError(f"{where}: a sentiment line starts with '+ ' or '- '")
        raw = {"text": text.strip(), "task": task, "label": LABELS[sign]}
    else:
        text, entities = parse_marked(line, where)
        if missed := unmarked_mentions(text, {e.text for e in entities}, entities):
            raise OodSourceError(f"{where}: {', '.join(missed)} marked once but also left unmarked; mark every mention")
        raw = {"text": text, "task": task, "entities": [e.model_dump() for e in entities]}
    return parse_record({**raw, "id": record_id, "source": where}, where)


def check_consistency(examples: list[OodExample]) -> None:
    """No text twice; no name marked in one NER sentence and left unmarked in another."""
    seen: dict[str, str] = {}
    for ex in examples:
        key = text_key(ex.record.text)
        if key in seen:
            raise OodSourceError(f"{ex.where}: the same text as {seen[key]}")
        seen[key] = ex.where
    ner = [ex for ex in examples if ex.record.entities is not None]
    names = {e.text for ex in ner for e in ex.record.entities}
    for ex in ner:
        if missed := unmarked_mentions(ex.record.text, names, ex.record.entities):
            raise OodSourceError(f"{ex.where}: {', '.join(missed)} marked as an entity elsewhere but not here")


def check_overlap(examples: list[OodExample], train: list[Record]) -> dict:
    """The overlap report against the training split; an error naming the texts when any is contaminated."""
    report = overlap_report(train, [ex.record for ex in examples])
    if report.exact or report.ngram_contaminated:
        raise DataError(f"{report.ngram_contaminated} out-of-domain texts overlap the training split "
                        f"({report.exact} exactly), e.g. {report.examples}: rewrite them in the source")
    return report.as_dict()


def ood_card(examples: list[OodExample], overlap: dict, source: str) -> dict:
    """Counts per task, label, sector and entity type, and the overlap check."""
    sentiment = [ex for ex in examples if ex.record.task == "sentiment"]
    ner = [ex for ex in examples if ex.record.task == "ner"]
    by_sector: dict[str, Counter] = {}
    for ex in sentiment:
        by_sector.setdefault(ex.sector, Counter())[ex.record.label] += 1
    entities = [(ex.sector, e.type) for ex in ner for e in ex.record.entities]
    return {
        "source": source, "records": len(examples),
        "sentiment": {"total": len(sentiment), "labels": dict(Counter(ex.record.label for ex in sentiment)),
                      "sectors": {s: dict(c) for s, c in by_sector.items()}},
        "ner": {"total": len(ner), "sectors": dict(Counter(ex.sector for ex in ner)),
                "entities": {t: sum(1 for _, k in entities if k == t) for t in ENTITY_TYPES},
                "entities_by_sector": {s: {t: entities.count((s, t)) for t in ENTITY_TYPES}
                                       for s in dict.fromkeys(ex.sector for ex in ner)},
                "sentences_without_entities": sum(1 for ex in ner if not ex.record.entities)},
        "overlap": {k: overlap[k] for k in ("train", "exact", "ngram", "threshold", "ngram_contaminated",
                                            "mean_ngram_overlap")},
    }


def build_ood(source: str | Path, train: str | Path, out: str | Path, card: str | Path) -> dict:
    """Parse and check the source, check it against the training split, write the set and its card."""
    examples = read_source(source)
    check_consistency(examples)
    if not Path(train).is_file():
        raise DataError(f"{train}: no training split to check the out-of-domain set against (run `lingtune prepare`)")
    summary = ood_card(examples, check_overlap(examples, read_jsonl(train)), str(source))
    write_jsonl(out, [ex.as_json() for ex in examples])
    write_json(card, summary)
    return summary


def ood_stage(params) -> dict:
    cfg = params.ood
    return build_ood(cfg.source, Path(params.data.out_dir) / "train.jsonl", cfg.out, cfg.card)
