"""Honest statistics for recall: bootstrap intervals over queries, and paired differences
between two models scored on the same queries (the difference counts when its interval excludes 0)."""

from __future__ import annotations

import numpy as np

from .metrics import hits_at_k

DEFAULT_RESAMPLES = 2000


def bootstrap_mean(
    values: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high) of ``values`` in percent: a percentile bootstrap over its entries."""
    if values.size == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return (
        100 * float(values.mean()),
        100 * float(np.quantile(means, alpha)),
        100 * float(np.quantile(means, 1 - alpha)),
    )


def recall_interval(
    ranks, k: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(R@k, low, high) in percent: a percentile bootstrap over queries."""
    return bootstrap_mean(hits_at_k(ranks, k), resamples, seed, level)


def paired_difference(
    ranks_a, ranks_b, k: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(R@k of a - R@k of b, low, high) in points, resampling the same queries for both models."""
    a, b = hits_at_k(ranks_a, k), hits_at_k(ranks_b, k)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs the same queries: {a.size} vs {b.size} ranks")
    return bootstrap_mean(a - b, resamples, seed, level)
