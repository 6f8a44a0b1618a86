"""The scorer every search path shares: query composition (texts, description, image-only "more
like this") and the exact gallery's ranking with exclusions and ties, against hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fashion_cir.evaluation.metrics import NOT_RETRIEVED
from fashion_cir.retrieval.scorer import DenseGallery, compose_queries


def test_search_ranks_by_inner_product_with_exclusions_and_stable_ties():
    items = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    gallery = DenseGallery(["a", "b", "c", "d"], items)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    assert gallery.search(query, 3) == [[("a", 1.0), ("c", 1.0), ("d", pytest.approx(0.6))]]  # a before c: gallery order
    assert [i for i, _ in gallery.search(query, 3, exclude=[["a"]])[0]] == ["c", "d", "b"]
    assert gallery.search(np.array([[0.0, 1.0], [1.0, 0.0]]), 1, exclude=[["b"], []]) == [[("d", pytest.approx(0.8))], [("a", 1.0)]]


def test_target_ranks_leave_out_each_querys_reference():
    items = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    gallery = DenseGallery(["ref", "near", "far"], items)
    queries = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    assert gallery.target_ranks(queries, ["near", "near", "gone"]).tolist() == [1, 1, NOT_RETRIEVED]
    assert gallery.target_ranks(queries, ["near", "near", "far"], exclude=["ref", None, "far"]).tolist() == [0, 1, 0]


def test_compose_queries_texts_and_image_only(tiny_model):
    image = torch.randn(2, tiny_model.backbone.feature_dim)
    composed = compose_queries(tiny_model, image, ["is red", "has long sleeves"], ["a white t-shirt", None])
    assert composed.texts == ["a white t-shirt, but is red", "has long sleeves"]
    vectors = composed.vectors("sum")
    text = tiny_model.backbone.embed_texts(composed.texts)
    by_hand = torch.nn.functional.normalize(image, dim=-1) + torch.nn.functional.normalize(text, dim=-1)
    torch.testing.assert_close(vectors, torch.nn.functional.normalize(by_hand, dim=-1), atol=1e-5, rtol=0)
    more_like_this = compose_queries(tiny_model, image, ["", ""])
    assert more_like_this.text is None and more_like_this.texts == []
    torch.testing.assert_close(more_like_this.vectors(), torch.nn.functional.normalize(image, dim=-1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 captions but 1 descriptions"):
        compose_queries(tiny_model, image, ["a", "b"], ["x"])


def test_compose_queries_with_a_description_matcher_keeps_the_training_mode():
    from fashion_cir.models.cir import CIRModel
    from fashion_cir.models.factory import create_backbone
    from fashion_cir.models.matcher import DescriptionMatcher

    model = CIRModel(create_backbone("tiny:4"), query_mode="sum", matcher=DescriptionMatcher("minilm", "prompt"))
    model.matcher.weight = 0.5
    model.train()
    image = torch.randn(2, model.backbone.feature_dim)
    composed = compose_queries(model, image, ["is red", "is blue"], ["a white t-shirt", None])
    assert model.training  # composing queries leaves a training model in training mode
    model.eval()
    matched = model.matcher.embed(["a white t-shirt, but is red", "is blue"], side="query")  # the matcher's own prompt
    torch.testing.assert_close(composed.matched, matched, atol=1e-5, rtol=0)
    text = model.backbone.embed_texts(composed.texts)
    by_hand = model.query_vectors(image, text, matched, "sum")
    torch.testing.assert_close(composed.vectors("sum"), by_hand, atol=1e-5, rtol=0)
    assert composed.vectors("sum").shape[1] == model.backbone.feature_dim + model.matcher.dim


def test_search_keeps_gallery_order_among_many_ties():
    gallery = DenseGallery([f"item{i:03d}" for i in range(200)], np.ones((200, 2), dtype=np.float32) / np.sqrt(2))
    top = gallery.search(np.array([[1.0, 0.0]], dtype=np.float32), 200)[0]
    assert [i for i, _ in top] == [f"item{i:03d}" for i in range(200)]


def test_an_exclusion_that_is_none_or_outside_the_gallery_excludes_nothing():
    gallery = DenseGallery(["a", "b", "c"], np.array([[0.0, 1.0], [1.0, 0.0], [0.9, 0.1]], dtype=np.float32))
    queries = np.array([[1.0, 0.0]] * 3, dtype=np.float32)
    assert gallery.target_ranks(queries, ["c", "c", "c"], exclude=[None, "not-in-gallery", "b"]).tolist() == [1, 1, 0]
