"""Recall@K with deterministic tie-breaking."""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (1, 5, 10, 50)
NOT_RETRIEVED = np.iinfo(np.int64).max  # rank of a target that is not in the gallery


def target_ranks(scores: np.ndarray, target_index: np.ndarray, exclude_index: np.ndarray | None = None) -> np.ndarray:
    """0-based rank of each query's target in its row of ``scores`` [Q, G].

    Ties are broken by gallery position (as a stable sort of -score would): the rank counts the
    items scoring strictly higher plus the tied items that come earlier in the gallery. A target
    index of -1 (target not in the gallery) gets rank ``NOT_RETRIEVED`` (never retrieved, at any K,
    even K > G). ``exclude_index``
    (CIRR-style reference removal) drops that item from the ranking; -1 excludes nothing."""
    scores = np.asarray(scores)  # comparisons only: exact in the scores' own dtype
    n_queries, n_gallery = scores.shape
    ranks = np.full(n_queries, NOT_RETRIEVED)  # int64, like NOT_RETRIEVED
    positions = np.arange(n_gallery)
    for q in range(n_queries):
        t = int(target_index[q])
        if t < 0:
            continue
        row = scores[q]
        t_score = row[t]
        ahead = (row > t_score) | ((row == t_score) & (positions < t))
        if exclude_index is not None and exclude_index[q] >= 0 and exclude_index[q] != t:
            ahead[exclude_index[q]] = False
        ranks[q] = int(ahead.sum())
    return ranks


def hits_at_k(ranks, k: int) -> np.ndarray:
    """1.0 for each query whose target ranks within the top K (0-based ranks), else 0.0."""
    return (np.asarray(ranks, dtype=np.int64) < k).astype(np.float64)


def recall_at_k(ranks: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Percentage of queries whose target ranks within the top K."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {f"R@{k}": 0.0 for k in ks}
    return {f"R@{k}": float(100.0 * hits_at_k(ranks, k).mean()) for k in ks}


def overall(metrics: dict[str, float]) -> float:
    """FashionIQ's summary figure: the mean of R@10 and R@50."""
    return (metrics["R@10"] + metrics["R@50"]) / 2


def add_overall(metrics: dict) -> dict:
    """``metrics`` with ``overall`` added when it has R@10 and R@50."""
    if "R@10" in metrics and "R@50" in metrics:
        metrics["overall"] = overall(metrics)
    return metrics
