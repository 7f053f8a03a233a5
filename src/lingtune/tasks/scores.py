"""Task metrics. An answer that does not parse counts as wrong, never as skipped.

* Classification: accuracy, macro-F1 and per-class precision/recall/F1 from scikit-learn. An invalid
  answer is scored as the label `invalid`, which is wrong for every example and lowers the recall
  of the true class (it is not one of the averaged classes, so it cannot earn precision).
* Extraction: entity-level strict match: a predicted entity is correct only when its type and exact
  character span equal a gold entity's (a partial span or a wrong type is a miss and a false
  positive). Counted as multisets, so a duplicated prediction of one gold entity earns one hit.
  An invalid answer predicts nothing. Micro precision/recall/F1 and the same per type.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

INVALID = "invalid"
SpanKey = tuple[int, int, str]
"""(start, end, type) of an entity: what strict matching compares."""


def classification_metrics(gold: list[str], predicted: list[str | None], labels: tuple[str, ...]) -> dict:
    """`predicted[i]` is None when the answer did not parse."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    pred = [p if p is not None else INVALID for p in predicted]
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, pred, labels=list(labels), zero_division=0)
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, pred)) if gold else 0.0,
        "macro_f1": float(f1_score(gold, pred, labels=list(labels), average="macro", zero_division=0)) if gold else 0.0,
        "invalid_rate": pred.count(INVALID) / len(pred) if pred else 0.0,
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for label, p, r, f, s in zip(labels, precision, recall, f1, support)},
        "confusion": confusion_rows(gold, pred, labels),
    }


def confusion_rows(gold: list[str], pred: list[str], labels: tuple[str, ...]) -> list[dict]:
    """Rows of (actual, predicted) for `dvc plots` confusion templates."""
    from sklearn.metrics import confusion_matrix

    columns = [*labels, INVALID]
    matrix = confusion_matrix(gold, pred, labels=columns) if gold else []
    return [{"actual": a, "predicted": p, "count": int(matrix[i][j])}
            for i, a in enumerate(labels) for j, p in enumerate(columns)]


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, gold: Counter, predicted: Counter) -> None:
        hits = gold & predicted
        self.tp += sum(hits.values())
        self.fp += sum((predicted - hits).values())
        self.fn += sum((gold - hits).values())

    def scores(self) -> dict:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": p, "recall": r, "f1": f, "support": self.tp + self.fn}


def span_metrics(gold: list[list[SpanKey]], predicted: list[list[SpanKey] | None], types: tuple[str, ...]) -> dict:
    """Strict span-and-type matching; `predicted[i]` is None when the answer did not parse."""
    total = Counts()
    per_type = {etype: Counts() for etype in types}
    for gold_spans, pred_spans in zip(gold, predicted):
        g, p = Counter(gold_spans), Counter(pred_spans or [])
        total.add(g, p)
        for etype, counts in per_type.items():
            counts.add(Counter({s: n for s, n in g.items() if s[2] == etype}),
                       Counter({s: n for s, n in p.items() if s[2] == etype}))
    invalid = sum(1 for p in predicted if p is None)
    return {"n": len(gold), **total.scores(), "invalid_rate": invalid / len(predicted) if predicted else 0.0,
            "per_type": {t: c.scores() for t, c in per_type.items()}}
