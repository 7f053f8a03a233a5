"""Contamination check between two files in the neutral format (`lingtune data overlap`).

* exact: eval texts whose normalised text (`dedupe.text_key`) is also in the training file;
* n-gram: for each eval text, the share of its character n-grams that occur anywhere in the
  training file; an eval text is "contaminated" when that share reaches `threshold`.
Character n-grams because Chinese has no spaces; n=8 by default (a shared 8-character run is
rarely chance in this domain, while common 3-4 character words are).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lingtune.data.dedupe import shingles, text_key
from lingtune.formats import Record
from lingtune.errors import DataError


@dataclass
class OverlapReport:
    train: int
    eval: int
    exact: int
    exact_rate: float
    ngram: int
    ngram_contaminated: int
    ngram_contaminated_rate: float
    mean_ngram_overlap: float
    threshold: float
    examples: list[str]
    """Up to five eval texts found in the training file."""

    def as_dict(self) -> dict:
        return asdict(self)


def overlap_report(train: list[Record], evaluation: list[Record], n: int = 8, threshold: float = 0.5) -> OverlapReport:
    if n < 1 or not 0 < threshold <= 1:
        raise DataError("n must be >= 1 and threshold in (0, 1]")
    train_keys = {text_key(r.text) for r in train}
    train_grams: set[str] = set()
    for key in train_keys:
        if len(key) >= n:
            train_grams |= shingles(key, n)
    exact, contaminated, shares, examples = 0, 0, [], []
    for record in evaluation:
        key = text_key(record.text)
        grams = shingles(key, n) if len(key) >= n else set()
        share = len(grams & train_grams) / len(grams) if grams else 0.0
        shares.append(share)
        if key in train_keys:
            exact += 1
        if key in train_keys or share >= threshold:
            contaminated += 1
            if len(examples) < 5:
                examples.append(record.text)
    total = len(evaluation)
    return OverlapReport(
        train=len(train), eval=total, exact=exact, exact_rate=exact / total if total else 0.0, ngram=n,
        ngram_contaminated=contaminated, ngram_contaminated_rate=contaminated / total if total else 0.0,
        mean_ngram_overlap=sum(shares) / total if total else 0.0, threshold=threshold, examples=examples,
    )


def overlap_text(report: OverlapReport) -> str:
    return (
        f"eval texts: {report.eval} (train: {report.train})\n"
        f"exact overlap: {report.exact} ({report.exact_rate:.1%})\n"
        f"{report.ngram}-gram overlap >= {report.threshold:.0%}: {report.ngram_contaminated} "
        f"({report.ngram_contaminated_rate:.1%}); mean share of eval {report.ngram}-grams seen in train: "
        f"{report.mean_ngram_overlap:.1%}"
    )
