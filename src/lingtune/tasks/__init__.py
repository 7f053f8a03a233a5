"""The tasks lingtune trains and serves, one object each. Everything that differs between tasks (prompt,
answer format, parser, metrics, reward, decoding constraint, the service's result) lives in its class;
the rest of lingtune loops over `TASKS`. A new task is a class here plus its data."""

from __future__ import annotations

from lingtune.errors import DataError
from lingtune.tasks.base import ClassificationTask, ParsedAnswer, Task
from lingtune.tasks.ner import Ner
from lingtune.tasks.sentiment import Sentiment

TASKS: dict[str, Task] = {task.name: task for task in (Sentiment(), Ner())}

__all__ = ["TASKS", "ClassificationTask", "ParsedAnswer", "Task", "get", "names", "to_result"]


def names() -> tuple[str, ...]:
    return tuple(TASKS)


def get(name: str | None) -> Task:
    """The task called `name`; a DataError naming the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; lingtune knows {', '.join(TASKS)}") from None


def to_result(task: str, text: str, answer: str) -> dict:
    """The service's JSON for one answer (a label, or entities with offsets plus `unlocated`: answer
    entities whose text is not in the input); `error` only when the answer did not parse. Shared by
    the task endpoints and the MLflow model, so both answer alike."""
    spec = get(task)
    parsed = spec.parse(answer)
    if not parsed.valid:
        return {"error": f"the answer did not parse ({parsed.error}): {answer[:200]!r}"}
    return spec.result(text, parsed)
