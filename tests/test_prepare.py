"""The prepare stage on the real corpora with small sizes, and its guarantees."""

import pytest

from lingtune.config import parse_params
from lingtune.data.dedupe import NearDuplicateIndex, text_key
from lingtune.data.prepare import PrepareError, build_dataset, prepare_stage
from lingtune.data.card import split_stats, read_splits

SMALL = {"data": {"sentiment": {"total": 400}, "ner": {"characters": 6000, "train_extra_characters": 0}}}


@pytest.fixture(scope="module")
def small():
    params = parse_params(SMALL)
    return params, build_dataset(params.data, params.seed)


def test_sizes_balance_and_budget(small):
    _, prepared = small
    stats = split_stats(prepared.splits)
    assert stats["sentiment"]["labels"] == {"positive": 200, "negative": 200}
    assert 6000 <= stats["ner"]["characters"] < 6000 + 160
    assert stats["splits"]["test"]["sentiment"] == 40
    for split in ("train", "val", "test"):
        shares = [r.label == "positive" for r in prepared.splits[split] if r.task == "sentiment"]
        assert shares and sum(shares) * 2 == len(shares)  # every split is balanced
    empty = stats["ner"]["sentences_without_entities"]
    assert 0 < empty < stats["ner"]["total"] / 3


def test_no_text_shared_across_splits_and_ids_unique(small):
    _, prepared = small
    seen, ids = {}, set()
    for split, records in prepared.splits.items():
        for r in records:
            key = text_key(r.text)
            assert seen.setdefault(key, split) == split, f"{r.text!r} in {seen[key]} and {split}"
            ids.add(r.id)
    assert seen and len(ids) == sum(len(r) for r in prepared.splits.values())


def test_conflicting_reviews_are_dropped(small):
    _, prepared = small
    assert prepared.selection["sentiment"]["conflicting_texts"] >= 47


def test_same_seed_same_data_other_seed_other_data(small):
    params, prepared = small
    again = build_dataset(params.data, params.seed)
    assert again.splits == prepared.splits
    other = build_dataset(params.data, params.seed + 1)
    assert other.splits["test"] != prepared.splits["test"]


def test_asking_for_more_than_the_corpus_has_is_a_clear_error():
    params = parse_params({"data": {"sentiment": {"total": 100_000}}})
    with pytest.raises(PrepareError, match="unique positive reviews"):
        build_dataset(params.data, params.seed)


def test_near_duplicates_are_caught():
    index = NearDuplicateIndex(parse_params({}).data.dedupe)
    base = "这家酒店的服务非常好，房间干净整洁，早餐也很丰富，下次出差还会再来住。"
    assert index.add(base)
    assert not index.add(base + "!")          # exact after normalisation
    assert not index.add(base + "谢谢")  # near duplicate: Jaccard of 5-char shingles ~0.94
    assert index.add("书的印刷质量很差，纸张发黄，而且有好几页装订错了。")
    assert index.stats() == {"kept": 2, "exact_duplicates": 1, "near_duplicates": 1}


def test_stage_writes_splits_card_and_mlflow_run(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    params = parse_params({**SMALL, "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    card = prepare_stage(params)
    assert card["sentiment"]["total"] == 400 and set(card["ner"]["entities"]) == {"PER", "LOC", "ORG"}
    assert card["corpus_entities"]["single_token"]["ORG"] == 3573
    assert (tmp_path / "data/processed/card.md").read_text().startswith("# lingtune dataset card")
    assert split_stats(read_splits("data/processed"))["sentiment"]["total"] == 400
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(card["mlflow_run_id"])
    assert run.data.metrics["sentiment.total"] == 400
    assert run.data.tags["lingtune.stage"] == "prepare"
    assert run.data.params["data.sentiment.total"] == "400"


def test_train_extras_go_to_train_only_and_leave_val_and_test_as_they_were(small):
    params, prepared = small
    more = parse_params({"data": {"sentiment": {"total": 400, "train_extra": 100},
                                  "ner": {"characters": 6000, "train_extra_characters": 4000}}})
    grown = build_dataset(more.data, more.seed)
    assert grown.splits["val"] == prepared.splits["val"] and grown.splits["test"] == prepared.splits["test"]
    reviews = [r for r in grown.splits["train"] if r.task == "sentiment"]
    assert len(reviews) == 320 + 100 and sum(r.label == "positive" for r in reviews) == 210  # still balanced
    assert {r.text for r in prepared.splits["train"] if r.task == "sentiment"} < {r.text for r in reviews}
    added = [r for r in grown.splits["train"] if r.task == "ner"]
    before = [r for r in prepared.splits["train"] if r.task == "ner"]
    assert {r.text for r in before} < {r.text for r in added}
    extra_chars = sum(len(r.text) for r in added) - sum(len(r.text) for r in before)
    assert 4000 <= extra_chars < 4000 + 2 * 160 and grown.selection["ner"]["train_extra_characters"] == extra_chars
    assert any(not r.entities for r in added if r.text not in {b.text for b in before})  # empty_fraction holds too
    # the one dedupe index covers the extras: none is a (near) duplicate of a val or test sentence
    index = NearDuplicateIndex(more.data.dedupe, more.seed)
    for r in grown.splits["val"] + grown.splits["test"]:
        index.add(r.text)
    extras = [r for r in added + reviews if r.text not in {b.text for b in prepared.splits["train"]}]
    assert len(extras) > 100 and all(index.add(r.text) for r in extras)


def test_more_extra_sentences_than_the_corpus_has_is_a_clear_error():
    from lingtune.data.corpora import read_peoples_daily

    params = parse_params({"data": {**SMALL["data"], "ner": {"characters": 6000, "train_extra_characters": 50_000}}})
    sentences = read_peoples_daily(compound_org=True)[:600]  # ~14k characters in length: the extras run out
    with pytest.raises(PrepareError, match="train_extra_characters=50000"):
        build_dataset(params.data, params.seed, sentences=sentences)
