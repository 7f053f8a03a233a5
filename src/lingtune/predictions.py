"""Per-example answers: the error-analysis lines of `lingtune eval --predictions`, and the evaluate
stage's validation answers, which the registry gate compares example by example.

One JSON object per example: `task`, `id` (when the record has one), `text`, the model's raw `answer`,
and the task's `explain` (lingtune.tasks): `valid`, `gold`, `predicted`, for NER the entities `missed`,
`spurious` and of the `wrong_type` with the match counts `tp`/`fp`/`fn`, for a classification `correct`.

The validation folder (`evaluate.out_dir`/validation) holds one such file per scored model and
`index.json`: model name -> the model (`model`, the `content_sha256` of its folder, the registry
`version` for a champion), its file and its number of examples. The gate finds a registered version's
answers by the version's content hash (tag `lingtune.content_sha256`), under whatever name it was scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lingtune import tasks
from lingtune.artifacts import publishing, write_json, write_jsonl
from lingtune.records import Record

INDEX = "index.json"


def example_rows(records: list[Record], answers: list[str]) -> list[dict]:
    """One error-analysis row per (record, answer)."""
    return [{"task": r.task, **({"id": r.id} if r.id else {}), "text": r.text, "answer": a,
             **tasks.get(r.task).explain(r, a)} for r, a in zip(records, answers)]


def read_rows(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass
class ScoredModel:
    """A model's answers on the validation split, and what identifies the model."""

    name: str
    model: str
    content_sha256: str | None
    rows: list[dict]
    version: str | None = None


def write_validation(folder: str | Path, split: str, scored: list[ScoredModel]) -> None:
    """The whole folder at once (publishing): the index never names answers of another run."""
    with publishing(folder) as staging:
        models = {}
        for m in scored:
            write_jsonl(staging / f"{m.name}.jsonl", m.rows)
            models[m.name] = {"model": m.model, "content_sha256": m.content_sha256, "version": m.version,
                              "predictions": f"{m.name}.jsonl", "examples": len(m.rows)}
        write_json(staging / INDEX, {"split": split, "models": models})


def validation_rows(folder: str | Path, content_sha256: str | None) -> tuple[str, list[dict]] | None:
    """(name, rows) of the scored model whose folder hashes to `content_sha256`; None when the folder,
    its index or such a model is missing."""
    index = Path(folder) / INDEX
    if content_sha256 is None or not index.is_file():
        return None
    for name, entry in json.loads(index.read_text(encoding="utf-8")).get("models", {}).items():
        if entry.get("content_sha256") == content_sha256:
            return name, read_rows(Path(folder) / entry["predictions"])
    return None
