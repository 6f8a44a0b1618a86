"""The exact in-memory gallery: ranking by inner product with exclusions and ties, against hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fashion_cir.retrieval.dense import DenseGallery


def test_search_ranks_by_inner_product_with_exclusions_and_stable_ties():
    items = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    gallery = DenseGallery(["a", "b", "c", "d"], items)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    assert gallery.search(query, 3) == [
        [("a", 1.0), ("c", 1.0), ("d", pytest.approx(0.6))]
    ]  # a before c: gallery order
    assert [i for i, _ in gallery.search(query, 3, exclude=[["a"]])[0]] == ["c", "d", "b"]
    assert gallery.search(np.array([[0.0, 1.0], [1.0, 0.0]]), 1, exclude=[["b"], []]) == [
        [("d", pytest.approx(0.8))],
        [("a", 1.0)],
    ]


def test_scores_are_float32_inner_products():
    items = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.25]])  # float64 in, float32 scores out
    gallery = DenseGallery(["a", "b", "c"], torch.from_numpy(items))
    scores = gallery.scores(np.array([[2.0, 1.0]]))
    assert scores.dtype == np.float32 and scores.tolist() == [[4.0, 0.0, 6.25]]
    scores = gallery.scores(torch.tensor([[2.0, 1.0]], dtype=torch.float64))
    assert scores.dtype == np.float32 and scores.tolist() == [[4.0, 0.0, 6.25]]
    assert DenseGallery(["a", "b", "c"], items).scores(np.array([[2.0, 1.0]], dtype=np.float32)).dtype == np.float32


def test_search_orders_ties_by_gallery_position_among_other_scores():
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 6, size=300)  # 300 items on 6 score levels, mixed along the gallery
    ids = [f"item{i:03d}" for i in range(300)]
    gallery = DenseGallery(ids, np.stack([levels / 10.0, np.zeros(300)], axis=1).astype(np.float32))
    top = gallery.search(np.array([[1.0, 0.0]], dtype=np.float32), 300, exclude=[["item007"]])[0]
    by_hand = sorted((i for i in range(300) if i != 7), key=lambda i: -levels[i])  # Python's sort is stable
    assert [item for item, _ in top] == [ids[i] for i in by_hand]


def test_search_keeps_gallery_order_among_many_ties():
    gallery = DenseGallery([f"item{i:03d}" for i in range(200)], np.ones((200, 2), dtype=np.float32) / np.sqrt(2))
    top = gallery.search(np.array([[1.0, 0.0]], dtype=np.float32), 200)[0]
    assert [i for i, _ in top] == [f"item{i:03d}" for i in range(200)]
