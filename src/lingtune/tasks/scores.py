"""Task metrics. An answer that does not parse counts as wrong, never as skipped.

* Classification: accuracy, macro-F1 and per-class precision/recall/F1 from scikit-learn. An invalid
  answer is scored as the label `invalid`, which is wrong for every example and lowers the recall
  of the true class (it is not one of the averaged classes, so it cannot earn precision).
* Extraction: entity-level strict match: a predicted entity is correct only when its type and exact
  character span equal a gold entity's (a partial span or a wrong type is a miss and a false
  positive). Counted as multisets, so a duplicated prediction of one gold entity earns one hit.
  An invalid answer predicts nothing. Micro precision/recall/F1 and the same per type.

The `*_resampled` functions compute the same summary metrics for many bootstrap resamples at once
(lingtune.bootstrap): each row of `weights` counts how often each example is drawn.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

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


def safe_ratio(numerator, denominator) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def classification_resampled(gold: list[str], predicted: list[str | None], labels: tuple[str, ...],
                             weights: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, macro_f1 and invalid_rate of every resample, as `classification_metrics` counts them."""
    g = np.asarray(gold, dtype=object)
    p = np.asarray([x if x is not None else INVALID for x in predicted], dtype=object)
    w = np.asarray(weights, dtype=float)
    f1 = []
    for label in labels:
        tp, fp, fn = w @ ((g == label) & (p == label)), w @ ((g != label) & (p == label)), w @ ((g == label) & (p != label))
        f1.append(safe_ratio(2 * tp, 2 * tp + fp + fn))
    drawn = w.sum(axis=1)
    return {"accuracy": safe_ratio(w @ (g == p), drawn), "macro_f1": np.mean(f1, axis=0),
            "invalid_rate": safe_ratio(w @ (p == INVALID), drawn)}


def span_resampled(tp: list[int], fp: list[int], fn: list[int], invalid: list[bool],
                   weights: np.ndarray) -> dict[str, np.ndarray]:
    """Micro precision, recall, f1 and invalid_rate of every resample, from per-example match counts."""
    w = np.asarray(weights, dtype=float)
    hits, false_pos, false_neg = w @ np.asarray(tp), w @ np.asarray(fp), w @ np.asarray(fn)
    precision, recall = safe_ratio(hits, hits + false_pos), safe_ratio(hits, hits + false_neg)
    return {"precision": precision, "recall": recall, "f1": safe_ratio(2 * precision * recall, precision + recall),
            "invalid_rate": safe_ratio(w @ np.asarray(invalid, dtype=float), w.sum(axis=1))}
