"""The reference policy and catalog items (retrieval/policy): where a reference's description and
attributes come from (catalog record, attribute heads, none), and the item vectors of a gallery
(image, cached description features, attribute one-hots), against vectors made by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fashion_cir.errors import ModelError
from fashion_cir.models.attributes import AttributeHeads
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.factory import create_backbone
from fashion_cir.models.fusion import AttributeSpace
from fashion_cir.models.matcher import DescriptionMatcher
from fashion_cir.retrieval.policy import ReferencePolicy, catalog_items, item_parts, resolve_references


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    from support.matcher import tiny_encoder

    return tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


def _pooled(matcher: DescriptionMatcher, texts: list[str]) -> torch.Tensor:
    """Normalised mean of the item encoder's last hidden states over real tokens, written out here."""
    tokens = matcher.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = matcher.item_encoder(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return mean / mean.norm(dim=-1, keepdim=True)


def _heads() -> AttributeHeads:
    """Heads whose predictions are known by hand: category follows the sign of the first normalised
    feature (logits +-10 u0: dress / pants), colour the sign of the second (+-10 u1: red / blue)."""
    heads = AttributeHeads(32, {"category": ["dress", "pants"], "color": ["red", "blue"]})
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
        heads.heads["category"].weight[0, 0], heads.heads["category"].weight[1, 0] = 10.0, -10.0
        heads.heads["color"].weight[0, 1], heads.heads["color"].weight[1, 1] = 10.0, -10.0
    return heads


def _sigmoid(x: float) -> float:
    return round(1 / (1 + math.exp(-x)), 4)


RECORDS = {
    "a": {"category": "t-shirt", "color": "white", "description": "a white t-shirt"},
    "b": {"category": "skirt", "color": "black"},
}  # "b" has attributes but no description


def test_references_follow_the_policy():
    model = CIRModel(create_backbone("tiny"))
    model.attach_heads(_heads())
    # u = (0.6, 0.8): a red dress; u = (-0.6, -0.8): a pair of blue pants
    image = torch.zeros(4, 32)
    image[:, :2] = torch.tensor([[3.0, 4.0], [3.0, 4.0], [-3.0, -4.0], [-3.0, -4.0]])
    red_dress = {
        "category": {"value": "dress", "confidence": _sigmoid(12.0)},
        "color": {"value": "red", "confidence": _sigmoid(16.0)},
    }
    blue_pants = {
        "category": {"value": "pants", "confidence": _sigmoid(12.0)},
        "color": {"value": "blue", "confidence": _sigmoid(16.0)},
    }
    ids = ["a", "b", "zz", None]  # a catalog item, one without a description, one without a record, an upload
    catalog = resolve_references(model, ReferencePolicy("catalog"), ids, image, RECORDS)
    assert [(r.description, r.attributes, r.source) for r in catalog] == [
        ("a white t-shirt", RECORDS["a"], "catalog"),
        (None, RECORDS["b"], "catalog"),
        ("a pair of blue pants", blue_pants, "predicted"),
        ("a pair of blue pants", blue_pants, "predicted"),
    ]
    predicted = resolve_references(model, ReferencePolicy("predicted"), ids, image, RECORDS)
    assert [(r.description, r.attributes, r.source) for r in predicted] == [
        ("a red dress", red_dress, "predicted"),
        ("a red dress", red_dress, "predicted"),
        ("a pair of blue pants", blue_pants, "predicted"),
        ("a pair of blue pants", blue_pants, "predicted"),
    ]
    for source, features in (("none", image), ("catalog", None)):  # no policy, or no reference image: nothing
        nothing = resolve_references(model, ReferencePolicy(source), ids, features, RECORDS)
        assert [(r.description, r.attributes, r.source) for r in nothing] == [(None, None, "none")] * 4
    without_heads = resolve_references(
        CIRModel(create_backbone("tiny")), ReferencePolicy("catalog"), ids, image, RECORDS
    )
    assert [r.source for r in without_heads] == ["catalog", "catalog", "none", "none"]
    # a triplet's own prompt replaces the catalog's description (and only under the catalog policy)
    prompts = ["a generated prompt", None, "another prompt", None]
    prompted = resolve_references(model, ReferencePolicy("catalog"), ids, image, RECORDS, prompts)
    assert [r.description for r in prompted] == ["a generated prompt", None, "another prompt", "a pair of blue pants"]
    assert [r.attributes for r in prompted] == [RECORDS["a"], RECORDS["b"], blue_pants, blue_pants]
    unprompted = resolve_references(model, ReferencePolicy("predicted"), ids, image, RECORDS, prompts)
    assert [r.description for r in unprompted] == [
        "a red dress",
        "a red dress",
        "a pair of blue pants",
        "a pair of blue pants",
    ]
    with pytest.raises(ModelError, match="unknown reference description source 'guessed'"):
        ReferencePolicy("guessed")


def test_catalog_items_join_each_items_cached_description_and_attributes(encoder, tmp_path):
    image = torch.randn(3, 32, generator=torch.Generator().manual_seed(6)) * torch.tensor([[0.5], [2.0], [9.0]])
    unit = image / image.norm(dim=-1, keepdim=True)
    records = {
        "a": {"description": "a red cotton dress", "color": "red"},
        "c": {"description": "black leather boots"},
        "zz": {"description": "not in this gallery"},
    }
    plain = CIRModel(create_backbone("tiny"))
    torch.testing.assert_close(
        catalog_items(plain, image, ["a", "b", "c"], records, tmp_path / "x"), unit, atol=1e-6, rtol=0
    )
    assert item_parts(plain, ["a", "b", "c"], records, tmp_path / "x") == (None, None)
    assert not (tmp_path / "x").exists()  # no matcher: no description cache
    space = AttributeSpace(names=["color", "length"])
    model = CIRModel(create_backbone("tiny"), matcher=DescriptionMatcher(encoder), attribute_space=space)
    vectors = catalog_items(model, image, ["a", "b", "c"], records, tmp_path / "cache")
    described = _pooled(model.matcher, ["a red cotton dress", "black leather boots"])
    assert vectors.shape == (3, 32 + 16 + space.dim)
    torch.testing.assert_close(vectors[:, :32], unit, atol=1e-6, rtol=0)  # the weights are on the query side
    torch.testing.assert_close(vectors[[0, 2], 32:48], described, atol=2e-3, rtol=0)  # fp16 in the cache
    assert torch.equal(vectors[1, 32:48], torch.zeros(16))  # "b" has no description
    hot = torch.zeros(3, space.dim)
    hot[0, space.slices["color"].start + space.values["color"].index("red")] = 1.0  # only "a" has an attribute
    assert torch.equal(vectors[:, 48:], hot)
    assert len(list((tmp_path / "cache").glob("descriptions-*.npz"))) == 1  # cached under cache_root
    no_records = catalog_items(model, image, ["a", "b", "c"], None, tmp_path / "cache")
    assert torch.equal(no_records[:, 32:], torch.zeros(3, 16 + space.dim))
    torch.testing.assert_close(no_records[:, :32], unit, atol=1e-6, rtol=0)
