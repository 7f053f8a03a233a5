"""Bootstrap confidence intervals over examples (or prompts): resample them with replacement, recompute
the statistic, read the interval off the percentiles.

A resample is a row of counts (how often each example is drawn), so a statistic that is a sum over
examples becomes one matrix product for all resamples at once, and two models scored on the same
examples share the same rows: a paired comparison. Seeded, so a decision taken on an interval (the
registry gate) is the same every time it is taken on the same predictions.
"""

from __future__ import annotations

import numpy as np


def resample_counts(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) integer counts: row b says how often each of the n items is drawn in resample b."""
    if n <= 0:
        raise ValueError("cannot resample an empty set")
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=samples)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The two-sided percentile interval holding `confidence` of the resampled values."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: list[float], confidence: float, samples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. per-prompt agreement)."""
    x = np.asarray(values, dtype=float)
    counts = resample_counts(len(x), samples, seed)
    return percentile_interval(counts @ x / len(x), confidence)

