"""The out-of-domain set: the shipped source builds into a file the project's readers load, with every
offset computed and matching its text, balanced labels in every sector, and every annotation rule the
build enforces failing loudly with `file:line`."""

import json
from collections import Counter

import pytest

from lingtune.config import parse_params
from lingtune.data.ood import OodSourceError, build_ood, check_consistency, ood_stage, parse_marked, read_source
from lingtune.errors import DataError
from lingtune.formats import read_jsonl, read_user_jsonl


@pytest.fixture(scope="module")
def shipped(root):
    return read_source(root / "data/ood/source.txt")


def write_source(tmp_path, text: str):
    path = tmp_path / "source.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_marks_become_offsets_into_the_plain_text():
    text, entities = parse_marked("我在{京东|ORG}买的，寄到{杭州市|LOC}{西湖区|LOC}。", "x:1")
    assert text == "我在京东买的，寄到杭州市西湖区。"
    assert [(e.start, e.end, e.type, e.text) for e in entities] == [
        (2, 4, "ORG", "京东"), (9, 12, "LOC", "杭州市"), (12, 15, "LOC", "西湖区")]
    assert all(text[e.start:e.end] == e.text for e in entities)


@pytest.mark.parametrize("line, problem", [
    ("{京东|COMPANY}发布公告", "type must be one of PER, LOC, ORG"),
    ("{京东|ORG发布公告", "a mark that does not parse"),
    ("京东|ORG}发布公告", "a mark that does not parse"),
    ("{ 京东|ORG}发布公告", "spaces around the name"),
])
def test_a_bad_mark_fails_with_its_line(line, problem):
    with pytest.raises(OodSourceError, match=problem):
        parse_marked(line, "source.txt:7")


@pytest.mark.parametrize("body, problem", [
    ("[ner bank_notice]\n{京东|ORG}和京东物流不是一家\n", r"source.txt:2: 京东 marked once but also left unmarked"),
    ("+ 很好\n", r"source.txt:1: a text before the first \[task sector\] line"),
    ("[sentiment bank]\n很好\n", r"source.txt:2: a sentiment line starts with"),
    ("[sentiment bank]\n+ 很好。\n- 很好!\n", r"source.txt:3: the same text as .*source.txt:2"),
    ("[ner a]\n{京东|ORG}发布公告\n[ner b]\n用户在京东下单\n", r"source.txt:4: 京东 marked as an entity elsewhere"),
])
def test_an_annotation_rule_broken_fails_with_its_line(tmp_path, body, problem):
    with pytest.raises(OodSourceError, match=problem):
        check_consistency(read_source(write_source(tmp_path, body)))


def test_a_name_inside_a_longer_entity_is_not_an_unmarked_mention(tmp_path):
    source = write_source(tmp_path, "[ner a]\n{京东|ORG}发布公告\n{京东物流|ORG}在{北京|LOC}新建仓库\n")
    check_consistency(read_source(source))


def test_the_shipped_set_is_balanced_and_every_sector_is_named(shipped):
    sentiment = [ex for ex in shipped if ex.record.task == "sentiment"]
    ner = [ex for ex in shipped if ex.record.task == "ner"]
    assert len(sentiment) >= 190 and len(ner) >= 140
    per_sector = Counter((ex.sector, ex.record.label) for ex in sentiment)
    for sector in {ex.sector for ex in sentiment}:
        assert per_sector[sector, "positive"] == per_sector[sector, "negative"] >= 10, sector
    assert len({ex.sector for ex in sentiment}) >= 5 and len({ex.sector for ex in ner}) >= 5
    empty = sum(1 for ex in ner if not ex.record.entities)
    assert 0.05 <= empty / len(ner) <= 0.15
    types = Counter(e.type for ex in ner for e in ex.record.entities)
    assert types["ORG"] >= 100 and types["LOC"] >= 50 and types["PER"] >= 25
    check_consistency(shipped)


def test_the_shipped_set_builds_into_a_file_the_readers_load(root, shipped, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text((root / "tests/data/train.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    out, card_path = tmp_path / "ood.jsonl", tmp_path / "card.json"
    card = build_ood(root / "data/ood/source.txt", train, out, card_path)

    loaded = read_user_jsonl(out)  # the evaluate stage's reader: `sector` is kept aside, not refused
    assert len(loaded.records) == len(shipped) and dict(loaded.ignored) == {"sector": len(shipped)}
    assert all(extra["sector"] for extra in loaded.extras)
    for record in loaded.records:
        assert all(record.text[e.start:e.end] == e.text for e in record.entities or ())
    with pytest.raises(DataError, match="sector"):  # the pipeline's strict reader refuses the extra key
        read_jsonl(out)
    stripped = tmp_path / "stripped.jsonl"
    stripped.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "sector"},
                                           ensure_ascii=False) + "\n" for line in out.read_text().splitlines()))
    assert read_jsonl(stripped) == loaded.records
    assert json.loads(card_path.read_text()) == card
    assert card["records"] == len(shipped) and card["overlap"]["exact"] == card["overlap"]["ngram_contaminated"] == 0
    assert card["sentiment"]["labels"] == {"positive": 100, "negative": 100}


def test_a_text_the_training_split_has_seen_is_refused(root, tmp_path):
    source = write_source(tmp_path, "[sentiment hotel_travel]\n+ 房间干净整洁，前台服务热情周到，下次出差还住这里。\n"
                                    "- 空调坏了三天没人修。\n")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "房间干净整洁,前台服务热情周到,下次出差还住这里。", "label": "positive"},
                                ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="1 out-of-domain texts overlap the training split .1 exactly"):
        build_ood(source, train, tmp_path / "ood.jsonl", tmp_path / "card.json")
    assert not (tmp_path / "ood.jsonl").exists()


def test_the_stage_reads_its_paths_from_params(tmp_path):
    params = parse_params({"ood": {"source": str(tmp_path / "missing.txt")}, "data": {"out_dir": str(tmp_path)}})
    with pytest.raises(OodSourceError, match="missing.txt: no such file"):
        ood_stage(params)
