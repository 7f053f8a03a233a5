"""`lingtune data convert`: the neutral format <-> chat messages (training template) <-> BIO."""

from __future__ import annotations

import json
from pathlib import Path

from lingtune import tasks
from lingtune.artifacts import write_text
from lingtune.formats import FormatError, Record, numbered_lines, read_bio, read_jsonl, write_bio, write_jsonl
from lingtune.tasks.base import TEXT_MARKER

FORMATS = ("neutral", "chat", "bio")


def to_messages(record: Record) -> list[dict]:
    return tasks.get(record.task).messages(record)


def from_messages(messages: list[dict]) -> Record:
    """Neutral record from a user/assistant pair written with lingtune's template."""
    roles = [m.get("role") for m in messages]
    if roles != ["user", "assistant"]:
        raise ValueError(f"expected a user and an assistant message, got roles {roles}")
    prompt, answer = messages[0]["content"], messages[1]["content"]
    task = next((t for t in tasks.TASKS.values() if prompt.startswith(f"任务：{t.title}\n")), None)
    if task is None or TEXT_MARKER not in prompt:
        raise ValueError("the user message was not written with lingtune's template")
    text = prompt.split(TEXT_MARKER, 1)[1]
    parsed = task.parse(answer)
    if not parsed.valid:
        raise ValueError(f"the assistant message does not parse: {parsed.error}")
    if isinstance(task, tasks.ClassificationTask):
        return Record(text=text, task=task.name, label=parsed.label)
    from lingtune.tasks.ner import locate_entities

    located, unlocated = locate_entities(text, parsed.entities)
    if unlocated:
        raise ValueError(f"entities not in the text: {unlocated}")
    return Record(text=text, task=task.name, entities=tuple(located))


def read_chat(path: Path) -> list[Record]:
    """One `{"messages": [user, assistant]}` object per line, written with lingtune's template."""
    records = []
    for where, line in numbered_lines(path):
        try:
            records.append(from_messages(json.loads(line)["messages"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{where}: not a lingtune chat example ({exc})") from None
    return records


def write_chat(path: Path, records: list[Record]) -> int:
    write_text(path, "".join(json.dumps({"messages": to_messages(r)}, ensure_ascii=False) + "\n" for r in records))
    return len(records)


def convert_file(source: Path, target: Path, from_format: str, to_format: str) -> int:
    for name in (from_format, to_format):
        if name not in FORMATS:
            raise FormatError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    if not Path(source).is_file():
        raise FormatError(f"{source}: no such file")
    if Path(source).resolve() == Path(target).resolve():
        raise FormatError("source and target are the same file; refusing to overwrite the input")
    readers = {"neutral": read_jsonl, "chat": read_chat, "bio": read_bio}
    writers = {"neutral": write_jsonl, "chat": write_chat, "bio": write_bio}
    records = readers[from_format](Path(source))
    return writers[to_format](Path(target), records)
