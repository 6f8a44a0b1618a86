"""Pair mining on small synthetic pools, checked against brute-force ranks and attribute differences."""

from __future__ import annotations

import numpy as np
import pytest

from fashion_cir.triplets import mining
from fashion_cir.triplets.config import TripletConfig
from fashion_cir.triplets.mining import _in_band, band_ranks, mine_pairs
from fashion_cir.triplets.table import WILDCARD, AttributeTable

ATTRIBUTES = ("color", "sleeves", "neck")


def _pool(n: int, seed: int, wildcard_share: float = 0.15) -> tuple[np.ndarray, AttributeTable]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 3, size=(n, 3)).astype(np.int16)
    codes[rng.random((n, 3)) < wildcard_share] = WILDCARD
    features = rng.normal(size=(n, 8))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features, AttributeTable(ATTRIBUTES, codes, rng.integers(0, 2, size=n).astype(np.int32))


def _differs(table: AttributeTable, i: int, j: int) -> tuple[str, ...]:
    a, b = table.codes[i], table.codes[j]
    return tuple(name for name, x, y in zip(table.attributes, a, b) if x != WILDCARD and y != WILDCARD and x != y)


def _eligible(features, table, config, reference) -> set[int]:
    """Targets of ``reference`` by brute force: rank among the other images by similarity in [low, high),
    same group, min..max changed attributes."""
    low, high = band_ranks(config, len(features))
    sims = features @ features[reference]
    out = set()
    for j in range(len(features)):
        if j == reference or table.groups[j] != table.groups[reference]:
            continue
        rank = sum(1 for m in range(len(features)) if m not in (j, reference) and sims[m] > sims[j])
        if low <= rank < high and config.min_changes <= len(_differs(table, reference, j)) <= config.max_changes:
            out.add(j)
    return out


@pytest.mark.parametrize(
    "band,unit,pool,expected",
    [
        ((0.15, 0.42), "quantile", 11, (1, 5)),  # floor(1.5), ceil(4.2) among 10 others
        ((0.0, 1.0), "quantile", 11, (0, 10)),
        ((3, 50), "rank", 11, (3, 10)),  # capped at the 10 others
        ((20, 50), "rank", 11, (10, 10)),
        ((2, 4), "rank", 100, (2, 4)),
    ],
)
def test_band_ranks(band, unit, pool, expected):
    low, high = band_ranks(TripletConfig(band=band, band_unit=unit), pool)
    assert (low, high) == expected and type(low) is int and type(high) is int


def test_in_band_marks_the_ranks_low_to_high_minus_one_of_each_row():
    rng = np.random.default_rng(3)
    sims = rng.normal(size=(5, 9))
    ranks = np.argsort(np.argsort(-sims, axis=1), axis=1)  # 0 = most similar
    for low, high in [(0, 1), (0, 9), (2, 5), (8, 9), (3, 4)]:
        assert np.array_equal(_in_band(sims, low, high), (ranks >= low) & (ranks < high)), (low, high)
    for low, high in [(0, 0), (4, 4), (5, 2)]:
        empty = _in_band(sims, low, high)
        assert empty.dtype == bool and empty.shape == (5, 9) and not empty.any()


@pytest.mark.parametrize(
    "seed,band,changes,per_reference",
    [
        (0, (2, 20), (1, 2), 2),
        (1, (0, 10), (1, 3), 3),
        (2, (5, 40), (2, 3), 1),
    ],
)
def test_every_pair_is_in_band_in_group_and_names_its_real_differences(seed, band, changes, per_reference):
    features, table = _pool(48, seed)
    config = TripletConfig(
        seed=seed,
        band=band,
        band_unit="rank",
        min_changes=changes[0],
        max_changes=changes[1],
        targets_per_reference=per_reference,
    )
    pairs, stats = mine_pairs(features, table, config)
    assert stats["band_ranks"] == list(band_ranks(config, 48))
    by_reference: dict[int, list[int]] = {}
    for pair in pairs:
        assert pair.target in _eligible(features, table, config, pair.reference)
        assert pair.changed == _differs(table, pair.reference, pair.target)
        by_reference.setdefault(pair.reference, []).append(pair.target)
    without = 0
    for reference in range(48):
        eligible = _eligible(features, table, config, reference)
        taken = by_reference.get(reference, [])
        assert len(taken) == len(set(taken)) == min(per_reference, len(eligible)), reference
        without += not eligible
    assert stats["references_without_target"] == without
    assert len(pairs) > 30
    # each pick is a least-used target: no other untaken target with as many changes had a lower mean use
    usage = dict.fromkeys(ATTRIBUTES, 0)
    taken: dict[int, set[int]] = {}
    mean_use = lambda names: sum(usage[n] for n in names) / len(names)  # noqa: E731
    for pair in pairs:
        done = taken.setdefault(pair.reference, set())
        rivals = [
            j
            for j in _eligible(features, table, config, pair.reference) - done - {pair.target}
            if len(_differs(table, pair.reference, j)) == len(pair.changed)
        ]
        best = min((mean_use(_differs(table, pair.reference, j)) for j in rivals), default=np.inf)
        assert mean_use(pair.changed) <= best + 1e-3, (pair, best)
        done.add(pair.target)
        for name in pair.changed:
            usage[name] += 1


def test_a_limit_stops_the_visit_and_counts_only_visited_references():
    features, table = _pool(40, 6)
    table.groups[::2] = np.arange(100, 120)  # every even image alone in its group: no target
    config = TripletConfig(seed=1, band=(0, 39), band_unit="rank", targets_per_reference=1, max_triplets=5)
    pairs, stats = mine_pairs(features, table, config)
    assert len(pairs) == 5
    visit = np.random.default_rng(1).permutation(40)  # the seeded visiting order
    last = list(visit).index(pairs[-1].reference)
    assert [p.reference for p in pairs] == [int(r) for r in visit[: last + 1] if r % 2 == 1]
    assert stats["references_without_target"] == sum(1 for r in visit[: last + 1] if r % 2 == 0)


def test_seeded_limited_and_chunked_runs(monkeypatch):
    features, table = _pool(40, 5)
    config = TripletConfig(seed=4, band=(1, 25), band_unit="rank", targets_per_reference=2)
    pairs, _ = mine_pairs(features, table, config)
    assert mine_pairs(features, table, config)[0] == pairs
    assert mine_pairs(features, table, config.model_copy(update={"seed": 5}))[0] != pairs
    for limit in (1, 7, 8):  # the limit can fall inside a reference's picks
        assert mine_pairs(features, table, config.model_copy(update={"max_triplets": limit}))[0] == pairs[:limit]
    monkeypatch.setattr(mining, "CHUNK", 7)  # references scored 7 at a time: same pairs
    assert mine_pairs(features, table, config)[0] == pairs
    assert mine_pairs(features, table, config.model_copy(update={"max_triplets": 9}))[0] == pairs[:9]


def test_picks_balance_the_changed_attributes_and_the_number_of_changes():
    """A pool where most candidate pairs differ in colour alone. Each reference draws its number of changes
    uniformly among the numbers it has targets for, then takes the target whose attributes were used least:
    attribute use comes out about even, and the change counts follow that uniform draw, not availability."""
    rng = np.random.default_rng(7)
    n = 150
    codes = np.zeros((n, 3), dtype=np.int16)
    codes[:, 0] = rng.integers(0, 6, size=n)  # colour varies a lot
    codes[:, 1] = (rng.random(n) < 0.12).astype(np.int16)  # sleeves and neck rarely
    codes[:, 2] = (rng.random(n) < 0.12).astype(np.int16)
    table = AttributeTable(ATTRIBUTES, codes, np.zeros(n, dtype=np.int32))
    features = rng.normal(size=(n, 8))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    config = TripletConfig(seed=0, band=(0, n), band_unit="rank", targets_per_reference=1)
    pairs, _ = mine_pairs(features, table, config)
    assert len(pairs) == n
    uses = {name: sum(name in p.changed for p in pairs) for name in ATTRIBUTES}
    sizes = {k: sum(len(p.changed) == k for p in pairs) for k in (1, 2, 3)}
    available = dict.fromkeys(ATTRIBUTES, 0)
    uniform_draw = dict.fromkeys((1, 2, 3), 0.0)  # expected counts under the uniform draw of the number
    by_availability = dict.fromkeys((1, 2, 3), 0.0)  # expected counts for a target picked at random
    for i in range(n):
        per_size = dict.fromkeys((1, 2, 3), 0)
        for j in range(n):
            if i != j and (d := _differs(table, i, j)):
                for name in d:
                    available[name] += 1
                per_size[len(d)] += 1
        present = [k for k in per_size if per_size[k]]
        for k in present:
            uniform_draw[k] += 1 / len(present)
            by_availability[k] += per_size[k] / sum(per_size.values())
    assert available["color"] > 3 * available["sleeves"] and available["color"] > 3 * available["neck"]
    assert max(uses.values()) < 1.25 * min(uses.values()), uses
    assert by_availability[1] > uniform_draw[1] + 40  # the two rules are far apart on this pool
    assert all(abs(sizes[k] - uniform_draw[k]) < 20 for k in sizes), (sizes, uniform_draw)


def test_ties_between_equally_used_targets_are_broken_at_random():
    # the first pick of a run has every attribute unused: all targets with the drawn number of changes tie
    features, table = _pool(30, 8, wildcard_share=0.0)
    config = TripletConfig(band=(0, 29), band_unit="rank", targets_per_reference=1, max_triplets=1)
    lowest_index = 0
    for seed in range(20):
        (pair,), _ = mine_pairs(features, table, config.model_copy(update={"seed": seed}))
        same_size = [
            j
            for j in _eligible(features, table, config, pair.reference)
            if len(_differs(table, pair.reference, j)) == len(pair.changed)
        ]
        assert pair.target in same_size
        lowest_index += pair.target == min(same_size)
    assert lowest_index < 10
