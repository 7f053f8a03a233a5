"""Validate stage: a Great Expectations (GX Core 1.x) suite over the processed splits.

The split files are read leniently (every line, even a broken one, becomes a row), flattened
into three tables, and checked:

* `sentiment` / `ner` (a row per record): non-empty text, length bounds of the task, label in
  {positive, negative}, unique id, no text repeated within or across splits (normalised key);
* `entities` (a row per entity): type in {PER, LOC, ORG}, span inside the text, text[start:end]
  equal to the entity text, no overlap with the previous entity of the same record;
* `splits` (a row per split): enough rows of each task, share of positive reviews in bounds.

Every failing row is named as `file:line` (and its id) in the report (`validate.report`, JSON)
and in the error, so the user can open the file at that line. A failure exits non-zero, which
stops `dvc repro` before any downstream stage writes anything.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lingtune.config import DataConfig, ValidateConfig
from lingtune.data.dedupe import text_key
from lingtune.artifacts import write_json
from lingtune.errors import DataError
from lingtune.records import SPLITS, TASK_OF_FIELD
from lingtune.tasks.ner import ENTITY_TYPES
from lingtune.tasks.sentiment import Sentiment

LABELS = Sentiment.labels
MAX_ROWS_IN_REPORT = 50


class ValidationFailed(DataError):
    """The data broke at least one expectation; `report` holds the details."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class Tables:
    sentiment: pd.DataFrame
    ner: pd.DataFrame
    entities: pd.DataFrame
    splits: pd.DataFrame


def _read_raw(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            raw = {"_unparsable": True}
        rows.append((where, raw if isinstance(raw, dict) else {"_unparsable": True}))
    return rows


def _task_of(raw: dict) -> str:
    if raw.get("task") in TASK_OF_FIELD.values():
        return raw["task"]
    return TASK_OF_FIELD["entities" if "entities" in raw else "label"]


def _overlapping(spans: list[tuple[int, int] | None]) -> set[int]:
    """Indices of spans that overlap an earlier-starting span of the same record."""
    order = sorted((span[0], span[1], k) for k, span in enumerate(spans) if span)
    hits, furthest = set(), -1
    for start, end, k in order:
        if start < furthest:
            hits.add(k)
        furthest = max(furthest, end)
    return hits


def _entity_rows(where: str, raw: dict, text: str) -> list[dict]:
    items = raw.get("entities")
    items = [e if isinstance(e, dict) else {} for e in (items if isinstance(items, list) else [None])]
    spans = [
        (e["start"], e["end"]) if isinstance(e.get("start"), int) and isinstance(e.get("end"), int) else None
        for e in items
    ]
    overlapping = _overlapping(spans)
    rows = []
    for k, (ent, span) in enumerate(zip(items, spans)):
        inside = span is not None and 0 <= span[0] < span[1] <= len(text)
        rows.append({
            "row": f"{where}#{k}", "type": ent.get("type"), "span_inside_text": inside,
            "span_matches_text": inside and text[span[0]:span[1]] == ent.get("text"),
            "overlaps_previous": k in overlapping,
        })
    return rows


def build_tables(data_dir: Path) -> Tables:
    records = {"sentiment": [], "ner": []}
    entities = []
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            raise ValidationFailed(f"{path}: missing (run the prepare stage first)", {"missing": str(path)})
        for where, raw in _read_raw(path):
            text = raw.get("text") if isinstance(raw.get("text"), str) else ""
            task = _task_of(raw)
            records[task].append({
                "row": where, "split": split, "id": raw.get("id"), "text": text, "key": text_key(text) or None,
                "label": raw.get("label"), "parsed": not raw.get("_unparsable", False),
            })
            if task == "ner":
                entities += _entity_rows(where, raw, text)
    frames = {task: pd.DataFrame(rows, columns=["row", "split", "id", "text", "key", "label", "parsed"])
              for task, rows in records.items()}
    summary = []
    for split in SPLITS:
        sent = frames["sentiment"][frames["sentiment"]["split"] == split]
        summary.append({
            "row": f"{split}.jsonl", "sentiment_rows": len(sent),
            "ner_rows": int((frames["ner"]["split"] == split).sum()),
            "positive_share": float((sent["label"] == "positive").mean()) if len(sent) else 0.0,
        })
    entity_columns = ["row", "type", "span_inside_text", "span_matches_text", "overlaps_previous"]
    return Tables(frames["sentiment"], frames["ner"], pd.DataFrame(entities, columns=entity_columns),
                  pd.DataFrame(summary))


def suites(data: DataConfig, cfg: ValidateConfig) -> dict[str, list]:
    """Expectations per table: the whole contract of the processed data, in one place."""
    import great_expectations.expectations as gxe

    def record_rules(min_chars: int, max_chars: int) -> list:
        return [
            gxe.ExpectColumnValuesToBeInSet(column="parsed", value_set=[True]),
            gxe.ExpectColumnValuesToNotBeNull(column="key"),
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=min_chars, max_value=max_chars),
            gxe.ExpectColumnValuesToBeUnique(column="key"),
            gxe.ExpectColumnValuesToNotBeNull(column="id"),
            gxe.ExpectColumnValuesToBeUnique(column="id"),
        ]

    low, high = cfg.positive_share
    return {
        "sentiment": record_rules(data.sentiment.min_chars, data.sentiment.max_chars)
        + [gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(LABELS)),
           gxe.ExpectColumnValuesToNotBeNull(column="label")],
        "ner": record_rules(data.ner.min_chars, data.ner.max_chars),
        "entities": [
            gxe.ExpectColumnValuesToBeInSet(column="type", value_set=list(ENTITY_TYPES)),
            gxe.ExpectColumnValuesToBeInSet(column="span_inside_text", value_set=[True]),
            gxe.ExpectColumnValuesToBeInSet(column="span_matches_text", value_set=[True]),
            gxe.ExpectColumnValuesToBeInSet(column="overlaps_previous", value_set=[False]),
        ],
        "splits": [
            gxe.ExpectColumnValuesToBeBetween(column="sentiment_rows", min_value=cfg.min_rows_per_split),
            gxe.ExpectColumnValuesToBeBetween(column="ner_rows", min_value=cfg.min_rows_per_split),
            gxe.ExpectColumnValuesToBeBetween(column="positive_share", min_value=low, max_value=high),
        ],
    }


def _describe(result) -> dict:
    config = result.expectation_config
    failing = [item.get("row") for item in result.result.get("unexpected_index_list") or []]
    return {
        "table": None, "expectation": config.type, "column": config.kwargs.get("column"),
        "success": bool(result.success), "failing_count": len(failing) if failing else
        result.result.get("unexpected_count", 0), "failing_rows": failing[:MAX_ROWS_IN_REPORT],
    }


def run_suites(tables: Tables, data: DataConfig, cfg: ValidateConfig) -> dict:
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("lingtune")
    checks = []
    for table, expectations in suites(data, cfg).items():
        frame = getattr(tables, table)
        if frame.empty and table == "entities":
            continue
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"lingtune_{table}", expectations=expectations))
        run = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
        result = run.run(batch_parameters={"dataframe": frame},
                         result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]})
        checks += [{**_describe(r), "table": table} for r in result.results]
    failed = [c for c in checks if not c["success"]]
    return {"success": not failed, "checks": checks, "failed": len(failed),
            "rows": {t: len(getattr(tables, t)) for t in ("sentiment", "ner", "entities")}}


def failure_message(report: dict) -> str:
    lines = [f"data validation failed: {report['failed']} expectation(s) broken"]
    for check in report["checks"]:
        if not check["success"]:
            rows = ", ".join(map(str, check["failing_rows"][:10])) or "(table-level)"
            more = "" if check["failing_count"] <= 10 else f" and {check['failing_count'] - 10} more"
            lines.append(f"  {check['table']}.{check['column']}: {check['expectation']} -> {rows}{more}")
    return "\n".join(lines)


def validate_dataset(data: DataConfig, cfg: ValidateConfig) -> dict:
    """Run the suite, write the report, raise ValidationFailed naming the rows if any check fails."""
    report = run_suites(build_tables(Path(data.out_dir)), data, cfg)
    path = Path(cfg.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    if not report["success"]:
        raise ValidationFailed(failure_message(report) + f"\nfull report: {path}", report)
    return report
