"""Hard negatives on a small hand-made attribute table, and against a brute-force second implementation."""

from __future__ import annotations

import numpy as np

from fashion_cir.triplets.mining import Pair
from fashion_cir.triplets.negatives import hard_negatives
from fashion_cir.triplets.table import WILDCARD, AttributeTable

W = WILDCARD
ATTRIBUTES = ("color", "sleeves", "neck")


def _brute_force(pair: Pair, features: np.ndarray, table: AttributeTable, k: int) -> list[int]:
    """Loop by loop: same group, every unchanged attribute equal (or a wildcard on either side), at least
    one changed attribute differing with both sides known; most similar to the target first, ties by index."""
    target = table.codes[pair.target]
    found = []
    for j, codes in enumerate(table.codes):
        if j in (pair.reference, pair.target) or table.groups[j] != table.groups[pair.target]:
            continue
        keeps, misses = True, False
        for a, name in enumerate(table.attributes):
            known = codes[a] != W and target[a] != W
            if name in pair.changed:
                misses |= known and codes[a] != target[a]
            elif known and codes[a] != target[a]:
                keeps = False
        if keeps and misses:
            found.append((-float(features[j] @ features[pair.target]), j))
    return [j for _, j in sorted(found)[:k]]


def test_hand_made_catalog():
    # reference 0 -> target 1 changes the colour (0 -> 1); the target's neck is unknown
    codes = np.array(
        [
            [0, 2, 1],  # 0 reference
            [1, 2, W],  # 1 target
            [0, 2, 3],  # 2 misses the colour, keeps sleeves (neck unknown on the target): negative
            [2, 2, 1],  # 3 another colour, not the target's: negative
            [1, 2, 0],  # 4 has the target's colour: not a negative
            [W, 2, 1],  # 5 colour unknown: cannot be shown to miss it
            [0, 1, 1],  # 6 misses the colour but changes the sleeves: not a negative
            [0, W, 1],  # 7 misses the colour, sleeves unknown: negative
            [0, 2, 1],  # 8 like 2 but another category group: not a negative
        ],
        dtype=np.int16,
    )
    table = AttributeTable(ATTRIBUTES, codes, np.array([0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=np.int32))
    features = np.eye(9)
    features[[2, 3, 7], 1] = [0.5, 0.9, 0.7]  # similarity to the target (row 1): 3 > 7 > 2
    pair = Pair(0, 1, ("color",))
    assert hard_negatives(pair, features, table, 5).tolist() == [3, 7, 2]
    assert hard_negatives(pair, features, table, 2).tolist() == [3, 7]
    none = hard_negatives(pair, features, table, 0)
    assert none.dtype == np.int64 and none.shape == (0,)
    assert features[[0]][none].shape == (0, 9)  # usable as an index


def test_equal_similarities_keep_catalog_order():
    codes = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [4, 0, 0], [5, 0, 0]], dtype=np.int16)
    table = AttributeTable(ATTRIBUTES, codes, np.zeros(6, dtype=np.int32))
    features = np.ones((6, 2)) / np.sqrt(2)
    assert hard_negatives(Pair(0, 1, ("color",)), features, table, 3).tolist() == [2, 3, 4]


def test_many_equal_similarities_keep_catalog_order():
    # numpy's default sort is not stable beyond 16 elements: 60 negatives on 6 similarity levels
    n = 62
    codes = np.zeros((n, 3), dtype=np.int16)
    codes[1, 0], codes[2:, 0] = 1, 2  # reference 0 -> target 1 changes colour; every other image has a third colour
    table = AttributeTable(ATTRIBUTES, codes, np.zeros(n, dtype=np.int32))
    levels = np.random.default_rng(0).integers(0, 6, size=n) / 10
    features = np.stack([levels, np.sqrt(1 - levels**2)], axis=1)
    features[1] = [1.0, 0.0]  # similarity to the target = the level, exactly
    expected = sorted(range(2, n), key=lambda j: (-levels[j], j))
    assert hard_negatives(Pair(0, 1, ("color",)), features, table, 60).tolist() == expected
    assert hard_negatives(Pair(0, 1, ("color",)), features, table, 25).tolist() == expected[:25]


def test_matches_a_brute_force_implementation_on_random_catalogs():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        n = int(rng.integers(6, 30))
        codes = rng.integers(-1, 3, size=(n, 3)).astype(np.int16)
        table = AttributeTable(ATTRIBUTES, codes, rng.integers(0, 2, size=n).astype(np.int32))
        features = rng.normal(size=(n, 4))
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        reference, target = (int(i) for i in rng.choice(n, 2, replace=False))
        changed = tuple(a for a in ATTRIBUTES if rng.random() < 0.5) or ("neck",)
        k = int(rng.integers(1, 6))
        pair = Pair(reference, target, changed)
        expected = _brute_force(pair, features, table, k)
        assert hard_negatives(pair, features, table, k).tolist() == expected
        checked += len(expected)
    assert checked > 60  # the random catalogs do produce negatives
