"""Recall@K and target ranks computed by hand on small score matrices."""

from __future__ import annotations

import numpy as np
import pytest

from fashion_cir.evaluation.metrics import add_overall, overall, recall_at_k, target_ranks


def test_ranks_by_hand_with_ties_and_missing_target():
    scores = np.array(
        [
            [0.1, 0.9, 0.5, 0.9],  # target 3 ties with item 1, which comes first -> rank 1
            [0.5, 0.5, 0.5, 0.5],  # all tied, target 2 -> items 0 and 1 come first -> rank 2
            [0.2, 0.3, 0.1, 0.0],  # target not in the gallery
            [0.9, 0.1, 0.8, 0.7],  # target 0 is the best -> rank 0
            [0.3, 0.2, 0.1, 0.4],  # target 2 is the worst -> rank 3
        ]
    )
    targets = np.array([3, 2, -1, 0, 2])
    ranks = target_ranks(scores, targets)
    assert ranks[[0, 1, 3, 4]].tolist() == [1, 2, 0, 3]
    recall = recall_at_k(ranks, ks=(1, 2, 3, 4))
    assert recall == pytest.approx({"R@1": 20.0, "R@2": 40.0, "R@3": 60.0, "R@4": 80.0})


def test_tie_breaking_is_by_gallery_position_like_a_stable_sort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 30)).astype(np.float64)  # many ties
    targets = rng.integers(0, 30, size=50)
    ranks = target_ranks(scores, targets)
    order = np.argsort(-scores, axis=1, kind="stable")
    expected = [int(np.where(order[q] == targets[q])[0][0]) for q in range(50)]
    assert ranks.tolist() == expected
    # same scores, same ranks: deterministic
    assert target_ranks(scores, targets).tolist() == expected


def test_missing_target_is_never_retrieved_even_when_k_exceeds_the_gallery():
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.2, 0.3]])
    ranks = target_ranks(scores, np.array([-1, 2]))
    recall = recall_at_k(ranks, ks=(1, 3, 10, 50))
    # query 1 hits at every K; query 0 (target absent) at none, even at K=50 > 3 gallery items
    assert recall == pytest.approx({"R@1": 50.0, "R@3": 50.0, "R@10": 50.0, "R@50": 50.0})


def test_reference_removal_cirr_vs_fashioniq():
    # the reference (index 0) scores highest, as it does in image-only retrieval
    scores = np.array(
        [
            [1.0, 0.2, 0.8, 0.5],  # target 2: rank 1 with the reference kept, 0 without it
            [0.1, 0.9, 0.95, 0.3],  # reference 3 scores below the target -> removal changes nothing
            [0.7, 0.7, 0.1, 0.2],  # target 1 ties with reference 0 (earlier) -> rank 1 kept, 0 removed
            [0.5, 0.4, 0.6, 0.3],  # reference == target: nothing removed, rank 2 either way
        ]
    )
    targets = np.array([2, 2, 1, 1])
    references = np.array([0, 3, 0, 1])
    kept = target_ranks(scores, targets)  # FashionIQ: the reference stays in the gallery
    removed = target_ranks(scores, targets, references)  # CIRR
    assert kept.tolist() == [1, 0, 1, 2]
    assert removed.tolist() == [0, 0, 0, 2]
    assert recall_at_k(kept, ks=(1,))["R@1"] == 25.0
    assert recall_at_k(removed, ks=(1,))["R@1"] == 75.0
    # -1 excludes nothing
    assert target_ranks(scores, targets, np.array([-1, -1, -1, -1])).tolist() == kept.tolist()


def test_recall_values_and_empty_input():
    ranks = np.array([0, 4, 9, 10, 49, 50, 100, 3])
    assert recall_at_k(ranks, ks=(1, 5, 10, 50)) == pytest.approx(
        {"R@1": 12.5, "R@5": 37.5, "R@10": 50.0, "R@50": 75.0}
    )
    assert recall_at_k(np.array([], dtype=np.int64), ks=(1, 10)) == {"R@1": 0.0, "R@10": 0.0}


def test_overall_is_the_mean_of_recall_at_10_and_50():
    assert overall({"R@1": 5.0, "R@10": 30.0, "R@50": 70.0}) == 50.0
    assert overall({"R@10": 12.5, "R@50": 40.0}) == 26.25
    with_both = add_overall({"R@10": 20.0, "R@50": 60.0, "n_queries": 3})
    assert with_both == {"R@10": 20.0, "R@50": 60.0, "n_queries": 3, "overall": 40.0}
    assert add_overall({"R@10": 20.0}) == {"R@10": 20.0}  # no R@50: nothing to average
    assert add_overall({"R@50": 20.0}) == {"R@50": 20.0}
