"""`lingtune data convert`: the neutral format <-> chat messages (training template) <-> BIO."""

from __future__ import annotations

import json
from pathlib import Path

from lingtune.data.formats import FormatError, Record, read_bio, read_jsonl, write_bio, write_jsonl
from lingtune.data.prompts import from_messages, to_messages

FORMATS = ("neutral", "chat", "bio")


def read_chat(path: Path) -> list[Record]:
    """One `{"messages": [user, assistant]}` object per line, written with lingtune's template."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(from_messages(json.loads(line)["messages"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise FormatError(f"{path}:{number}: not a lingtune chat example ({exc})") from None
    return records


def write_chat(path: Path, records: list[Record]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({"messages": to_messages(record)}, ensure_ascii=False) + "\n")
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
