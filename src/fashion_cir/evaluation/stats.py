"""Honest statistics for recall: bootstrap intervals over queries, and paired differences
between two models scored on the same queries (the difference counts when its interval excludes 0)."""

from __future__ import annotations

import numpy as np

DEFAULT_RESAMPLES = 2000


def _hits(ranks, k: int) -> np.ndarray:
    return (np.asarray(ranks, dtype=np.int64) < k).astype(np.float64)


def recall_interval(ranks, k: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float, float]:
    """(R@k, low, high) in percent: a percentile bootstrap over queries."""
    hits = _hits(ranks, k)
    if hits.size == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, hits.size, size=(resamples, hits.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return 100 * hits.mean(), 100 * float(np.quantile(means, alpha)), 100 * float(np.quantile(means, 1 - alpha))


def paired_difference(ranks_a, ranks_b, k: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """(R@k of a - R@k of b, low, high) in points, resampling the same queries for both models."""
    a, b = _hits(ranks_a, k), _hits(ranks_b, k)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs the same queries: {a.size} vs {b.size} ranks")
    if a.size == 0:
        return 0.0, 0.0, 0.0
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return 100 * diff.mean(), 100 * float(np.quantile(means, alpha)), 100 * float(np.quantile(means, 1 - alpha))
