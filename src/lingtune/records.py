"""One example in the neutral task format, in memory: a text and its gold answer.

* a classification task's record carries `label`;
* an extraction task's record carries `entities`, character spans into `text` (end exclusive).

`task` names the task (lingtune.tasks); when a file leaves it out it is the default task of the
field the record carries (TASK_OF_FIELD). Which labels and entity types a task accepts is the
task's business (`Task.check_record`); this module only checks the shape.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

SPLITS: tuple[str, ...] = ("train", "val", "test")
TASK_OF_FIELD = {"label": "sentiment", "entities": "ner"}
"""The task a record without `task` belongs to, by the gold field it carries."""


class Entity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    type: str = Field(min_length=1)
    text: str = Field(min_length=1)


class Record(BaseModel):
    """One example of any task in the neutral format."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    text: str = Field(min_length=1)
    task: str | None = None
    label: str | None = None
    entities: tuple[Entity, ...] | None = None
    id: str | None = None
    source: str | None = None

    @model_validator(mode="after")
    def _one_gold_field(self) -> "Record":
        if (self.label is None) == (self.entities is None):
            raise ValueError("a record has exactly one of 'label' (sentiment) or 'entities' (ner)")
        if self.task is None:
            object.__setattr__(self, "task", TASK_OF_FIELD["label" if self.label is not None else "entities"])
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


def record_to_json(record: Record) -> dict:
    return record.model_dump(mode="json", exclude_none=True)
