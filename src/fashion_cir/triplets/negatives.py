"""Hard negatives: catalog images that match the target on every unchanged attribute but miss at
least one of the requested changes (they still look like the reference there), ranked by
static-feature similarity to the target."""

from __future__ import annotations

import numpy as np

from .mining import Pair
from .table import WILDCARD, AttributeTable


def hard_negatives(pair: Pair, features: np.ndarray, table: AttributeTable, k: int) -> np.ndarray:
    """Up to ``k`` pool indices, most similar to the target first (never the reference or target)."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    target = table.codes[pair.target]
    changed = np.array([name in pair.changed for name in table.attributes])
    same = (table.codes == target) | (table.codes == WILDCARD) | (target == WILDCARD)
    missed = (table.codes != target) & (table.codes != WILDCARD) & (target != WILDCARD)
    mask = same[:, ~changed].all(axis=1) & missed[:, changed].any(axis=1)
    mask &= table.groups == table.groups[pair.target]
    mask[[pair.reference, pair.target]] = False
    candidates = np.flatnonzero(mask)
    sims = features[candidates] @ features[pair.target]
    return candidates[np.argsort(-sims, kind="stable")[:k]]
