"""Bootstrap intervals and paired differences, checked against cases worked out by hand and
against the normal approximation."""

from __future__ import annotations

import numpy as np
import pytest

from fashion_cir.evaluation.stats import paired_difference, recall_interval


def test_interval_brackets_the_recall_and_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    ranks = np.where(rng.random(400) < 0.4, 3, 100)  # 40% of targets in the top 10
    recall, low, high = recall_interval(ranks, 10, resamples=4000)
    assert recall == pytest.approx(100 * (ranks < 10).mean())
    half_width = 1.96 * np.sqrt(recall / 100 * (1 - recall / 100) / 400) * 100
    assert low < recall < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)


def test_constant_hits_give_a_zero_width_interval():
    assert recall_interval([0, 1, 2, 3], 10) == (100.0, 100.0, 100.0)
    assert recall_interval([50, 60], 10) == (0.0, 0.0, 0.0)
    assert recall_interval([], 10) == (0.0, 0.0, 0.0)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    ranks = np.random.default_rng(1).integers(0, 100, 300)
    assert paired_difference(ranks, ranks, 10) == (0.0, 0.0, 0.0)


def test_paired_difference_counts_only_the_queries_that_changed():
    # 240 queries; model a finds 24 more targets in its top 10 than b and loses none: +10 points
    b = np.full(240, 30)
    a = b.copy()
    a[:24] = 0
    diff, low, high = paired_difference(a, b, 10)
    assert diff == pytest.approx(10.0)
    assert 0 < low < diff < high
    # an unpaired view of the same two models would be far wider: the pairing is what makes it tight
    assert high - low < 2 * 1.96 * np.sqrt(2 * 0.1 * 0.9 / 240) * 100


def test_a_tie_on_average_has_an_interval_around_zero():
    b = np.full(240, 30)
    a = b.copy()
    a[:20] = 0   # a wins 20 queries
    b[20:40] = 0  # b wins 20 others
    diff, low, high = paired_difference(a, b, 10)
    assert diff == 0 and low < 0 < high


def test_paired_difference_needs_the_same_queries():
    with pytest.raises(ValueError, match="same queries"):
        paired_difference([1, 2, 3], [1, 2], 10)
