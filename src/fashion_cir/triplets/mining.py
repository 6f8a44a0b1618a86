"""Mining (reference, target) pairs: a static-feature similarity band (SPN4CIR) intersected with an
attribute difference of ``min_changes``..``max_changes`` attributes, balanced over which attributes change."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import TripletConfig
from .table import AttributeTable

CHUNK = 256


@dataclass(frozen=True)
class Pair:
    """Pool indices of reference and target, and the names of the attributes that differ."""

    reference: int
    target: int
    changed: tuple[str, ...]


def band_ranks(config: TripletConfig, pool_size: int) -> tuple[int, int]:
    """The band as neighbour ranks [low, high) among the ``pool_size - 1`` other images."""
    others = pool_size - 1
    low, high = config.band
    if config.band_unit == "quantile":
        low, high = np.floor(low * others), np.ceil(high * others)
    return min(int(low), others), min(int(high), others)


def _in_band(sims: np.ndarray, low: int, high: int) -> np.ndarray:
    """Mask of the entries ranked low..high-1 in each row (rank 0 = most similar)."""
    if high <= low:
        return np.zeros(sims.shape, dtype=bool)
    order = -sims
    part = np.partition(order, [low, high - 1], axis=1)
    return (order >= part[:, low : low + 1]) & (order <= part[:, high - 1 : high])


def mine_pairs(features: np.ndarray, table: AttributeTable, config: TripletConfig) -> tuple[list[Pair], dict]:
    """Pairs over the pool (rows of L2-normalised ``features`` aligned with ``table``). References are
    visited in a seeded random order; each takes up to ``targets_per_reference`` targets: a number of
    changed attributes is drawn uniformly among those available, then the target whose changed attributes
    have been used least so far is taken (ties broken at random)."""
    rng = np.random.default_rng(config.seed)
    size = len(features)
    low, high = band_ranks(config, size)
    usage = np.zeros(len(table.attributes))
    pairs: list[Pair] = []
    without_target = 0
    order = rng.permutation(size)
    limit = config.max_triplets if config.max_triplets is not None else size * config.targets_per_reference
    for start in range(0, size, CHUNK):
        if len(pairs) >= limit:
            break
        rows = order[start : start + CHUNK]
        sims = features[rows] @ features.T
        sims[np.arange(len(rows)), rows] = -np.inf
        candidates = _in_band(sims, low, high) & (table.groups[rows][:, None] == table.groups[None, :])
        diff = table.differences(rows)
        count = diff.sum(axis=2)
        candidates &= (count >= config.min_changes) & (count <= config.max_changes)
        candidates[np.arange(len(rows)), rows] = False
        for r, reference in enumerate(rows):
            if len(pairs) >= limit:
                break
            targets = np.flatnonzero(candidates[r])
            if not len(targets):
                without_target += 1
                continue
            changed = diff[r, targets]
            taken = np.zeros(len(targets), dtype=bool)
            sizes = changed.sum(axis=1)
            for _ in range(min(config.targets_per_reference, len(targets), limit - len(pairs))):
                size_wanted = rng.choice(np.unique(sizes[~taken]))  # as many 1- as 2- or 3-attribute changes
                score = (changed @ usage) / sizes + rng.random(len(targets)) * 1e-3
                score[taken | (sizes != size_wanted)] = np.inf
                best = int(np.argmin(score))
                taken[best] = True
                usage += changed[best]
                names = tuple(n for n, c in zip(table.attributes, changed[best]) if c)
                pairs.append(Pair(int(reference), int(targets[best]), names))
    return pairs, {"band_ranks": [low, high], "references_without_target": without_target}
