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


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    from support.matcher import tiny_encoder

    return tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


def _trained_matcher(encoder: str, template: str, weight: float):
    """A matcher whose query encoder was trained (perturbed): its query and item sides differ."""
    from fashion_cir.models.matcher import DescriptionMatcher

    matcher = DescriptionMatcher(encoder, template, weight)
    with torch.no_grad():
        for param in matcher.query_encoder.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    return matcher


def _pooled(encoder: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Normalised mean of the last hidden states over real tokens, written out here."""
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return mean / mean.norm(dim=-1, keepdim=True)


def test_compose_queries_with_a_description_matcher_keeps_the_training_mode(encoder):
    from fashion_cir.models.cir import CIRModel
    from fashion_cir.models.factory import create_backbone

    model = CIRModel(create_backbone("tiny:4"), query_mode="sum", matcher=_trained_matcher(encoder, "prompt", 0.36))
    model.train()
    image = torch.randn(2, model.backbone.feature_dim)
    composed = compose_queries(model, image, ["is red", "is blue"], ["a white t-shirt", None])
    assert model.training  # composing queries leaves a training model in training mode
    model.eval()
    # the matcher's own prompt, through its trained query encoder (not the item encoder)
    matched = _pooled(model.matcher.query_encoder, model.matcher.tokenizer, ["a white t-shirt, but is red", "is blue"])
    torch.testing.assert_close(composed.matched, matched, atol=1e-5, rtol=0)
    assert not torch.allclose(matched, _pooled(model.matcher.item_encoder, model.matcher.tokenizer,
                                               ["a white t-shirt, but is red", "is blue"]), atol=1e-2)
    text = model.backbone.embed_texts(composed.texts)
    unit = torch.nn.functional.normalize
    by_hand = torch.cat([0.8 * unit(unit(image, dim=-1) + unit(text, dim=-1), dim=-1), 0.6 * matched], dim=1)
    torch.testing.assert_close(composed.vectors("sum"), by_hand, atol=1e-5, rtol=0)
    # another mode than the model's: the image side alone, the matcher side unchanged
    torch.testing.assert_close(composed.vectors("image"), torch.cat([0.8 * unit(image, dim=-1), 0.6 * matched], dim=1),
                               atol=1e-5, rtol=0)


def test_query_vectors_in_a_given_mode_and_text_only_queries(tiny_model):
    unit = torch.nn.functional.normalize
    image = torch.randn(2, tiny_model.backbone.feature_dim, generator=torch.Generator().manual_seed(5)) * 3
    composed = compose_queries(tiny_model, image, ["is red", "has long sleeves"])
    text = tiny_model.backbone.embed_texts(["is red", "has long sleeves"])
    torch.testing.assert_close(composed.vectors("text"), unit(text, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(composed.vectors("image"), unit(image, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(composed.vectors("sum_raw"), unit(image + text, dim=-1), atol=1e-5, rtol=0)
    text_only = compose_queries(tiny_model, None, ["is red", "has long sleeves"])  # no reference image
    assert text_only.image is None
    torch.testing.assert_close(text_only.vectors(), unit(text, dim=-1), atol=1e-5, rtol=0)


def test_catalog_item_vectors_join_each_items_cached_description(encoder, tmp_path):
    from fashion_cir.models.cir import CIRModel
    from fashion_cir.models.factory import create_backbone
    from fashion_cir.retrieval.scorer import catalog_item_vectors

    image = torch.randn(3, 32, generator=torch.Generator().manual_seed(6)) * torch.tensor([[0.5], [2.0], [9.0]])
    unit = image / image.norm(dim=-1, keepdim=True)
    plain = CIRModel(create_backbone("tiny"))
    torch.testing.assert_close(catalog_item_vectors(plain, image, ["a", "b", "c"], {"a": "a red dress"}, tmp_path / "x"),
                               unit, atol=1e-6, rtol=0)
    assert not (tmp_path / "x").exists()  # no matcher: no description cache
    model = CIRModel(create_backbone("tiny"), matcher=_trained_matcher(encoder, "caption", 0.36))
    descriptions = {"a": "a red cotton dress", "c": "black leather boots", "zz": "not in this gallery"}
    vectors = catalog_item_vectors(model, image, ["a", "b", "c"], descriptions, tmp_path / "cache")
    described = _pooled(model.matcher.item_encoder, model.matcher.tokenizer, ["a red cotton dress", "black leather boots"])
    assert vectors.shape == (3, 48)
    torch.testing.assert_close(vectors[:, :32], 0.8 * unit, atol=1e-6, rtol=0)
    torch.testing.assert_close(vectors[[0, 2], 32:], 0.6 * described, atol=2e-3, rtol=0)  # fp16 in the cache
    assert torch.equal(vectors[1, 32:], torch.zeros(16))  # "b" has no description
    assert len(list((tmp_path / "cache").glob("descriptions-*.npz"))) == 1  # cached under cache_root
    no_descriptions = catalog_item_vectors(model, image, ["a", "b", "c"], None, tmp_path / "cache")
    assert torch.equal(no_descriptions[:, 32:], torch.zeros(3, 16))
    torch.testing.assert_close(no_descriptions[:, :32], 0.8 * unit, atol=1e-6, rtol=0)


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


def test_an_exclusion_that_is_none_or_outside_the_gallery_excludes_nothing():
    gallery = DenseGallery(["a", "b", "c"], np.array([[0.0, 1.0], [1.0, 0.0], [0.9, 0.1]], dtype=np.float32))
    queries = np.array([[1.0, 0.0]] * 3, dtype=np.float32)
    assert gallery.target_ranks(queries, ["c", "c", "c"], exclude=[None, "not-in-gallery", "b"]).tolist() == [1, 1, 0]
