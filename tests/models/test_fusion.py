"""The one fusion path: attribute rows by hand, and fused inner products equal to the weighted sum
of the term scores (a second, plain implementation written here)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fashion_cir.language.changes import read_changes
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.factory import create_backbone
from fashion_cir.models.fusion import EFFECTS, AttributeSpace, Fusion, QueryParts
from fashion_cir.models.matcher import DescriptionMatcher
from support.matcher import tiny_encoder

REFERENCE = {
    "category": "dress",
    "color": "blue",
    "secondary_color": None,
    "pattern": "solid",
    "sleeves": "none",
    "neckline": "crew",
    "length": "knee",
    "material": "cotton",
    "closure": "unknown",
}


def slot(space: AttributeSpace, name: str, value) -> int:
    return space.slices[name].start + space.values[name].index(value)


def test_query_rows_by_hand():
    space = AttributeSpace()
    rows = space.query_rows(REFERENCE, read_changes("is red and shorter, no stripes"))
    expected = {term: torch.zeros(space.dim) for term in space.terms()}
    expected["want:color"][slot(space, "color", "red")] = 1
    expected["away:color"][slot(space, "color", "blue")] = 1
    for length in ("cropped", "hip", "thigh"):
        expected["want:length"][slot(space, "length", length)] = 1
    expected["away:length"][slot(space, "length", "knee")] = 1
    expected["want:pattern"][slot(space, "pattern", "solid")] = 1  # "no stripes": plain
    expected["unwanted:pattern"][slot(space, "pattern", "striped")] = 1
    for name, value in (("category", "dress"), ("neckline", "crew"), ("material", "cotton")):
        expected[f"keep:{name}"][slot(space, name, value)] = 1
    # sleeves "none", closure "unknown" and an empty secondary colour are wildcards or nothing: never kept
    for term in space.terms():
        assert torch.equal(rows[term], expected[term]), term


def test_darker_and_longer_sleeves_want_every_value_beyond_the_reference():
    space = AttributeSpace()
    reference = {**REFERENCE, "sleeves": "short"}
    rows = space.query_rows(reference, read_changes("darker with longer sleeves"))
    darker = {slot(space, "color", c) for c in ("black", "navy", "brown")}  # levels below blue's
    assert set(rows["want:color"].nonzero().flatten().tolist()) == darker
    assert rows["away:color"].nonzero().flatten().tolist() == [slot(space, "color", "blue")]
    longer = {slot(space, "sleeves", s) for s in ("three-quarter", "long")}
    assert set(rows["want:sleeves"].nonzero().flatten().tolist()) == longer
    assert rows["away:sleeves"].nonzero().flatten().tolist() == [slot(space, "sleeves", "short")]
    assert not rows["keep:color"].any() and not rows["keep:sleeves"].any()
    assert rows["keep:length"][slot(space, "length", "knee")] == 1
    # a reference colour without a lightness (multicolor) wants nothing darker and still moves away
    rows = space.query_rows({**REFERENCE, "color": "multicolor"}, read_changes("darker"))
    assert not rows["want:color"].any()
    assert rows["away:color"][slot(space, "color", "multicolor")] == 1


def test_predicted_references_are_kept_by_their_confidence_and_uploads_without_one_keep_nothing():
    space = AttributeSpace()
    rows = space.query_rows({"color": {"value": "green", "confidence": 0.25}}, read_changes("with long sleeves"))
    assert rows["keep:color"][slot(space, "color", "green")] == 0.25
    empty = space.query_rows(None, read_changes("with long sleeves"))
    assert all(not empty[t].any() for t in space.terms() if not t.startswith("want:"))
    assert empty["want:sleeves"][slot(space, "sleeves", "long")] == 1


def test_one_hot_of_items():
    space = AttributeSpace()
    hot = space.one_hot([REFERENCE, None, {"color": {"value": "red", "confidence": 0.9}}])
    assert hot[0].sum() == len(space.names)  # every attribute has a slot, None included
    assert hot[0, slot(space, "secondary_color", None)] == 1
    assert not hot[1].any()
    assert hot[2].sum() == 1 and hot[2, slot(space, "color", "red")] == 1


@pytest.fixture(scope="module")
def fused_model(tmp_path_factory):
    spec = tiny_encoder(tmp_path_factory.mktemp("encoder"))
    return CIRModel(
        create_backbone("tiny:0"), "sum", matcher=DescriptionMatcher(spec), attribute_space=AttributeSpace()
    )


def test_fused_vectors_score_the_weighted_sum_of_terms(fused_model):
    torch.manual_seed(0)
    model, space, n, g = fused_model, fused_model.attribute_space, 5, 7
    d, m = model.backbone.feature_dim, model.matcher.dim
    parts = QueryParts(
        torch.randn(n, d),
        torch.randn(n, d),
        F.normalize(torch.randn(n, m), dim=-1),
        F.normalize(torch.randn(n, m), dim=-1),
        F.normalize(torch.randn(n, m), dim=-1),
        {t: torch.rand(n, space.dim) for t in space.terms()},
    )
    image, description, attributes = torch.randn(g, d), F.normalize(torch.randn(g, m), dim=-1), torch.rand(g, space.dim)
    weights = {
        t: float(w)
        for t, w in zip(
            ["composed", "reference", "caption", "prompt", "reference_description", *space.terms()],
            torch.randn(5 + len(space.terms())),
        )
    }
    fusion = Fusion.from_weights(weights)
    fused = model.query_vectors(parts, fusion=fusion) @ model.item_vectors(image, description, attributes).T
    items = F.normalize(image, dim=-1)
    composed = F.normalize(F.normalize(parts.reference, dim=-1) + F.normalize(parts.text, dim=-1), dim=-1)
    plain = (
        weights["composed"] * composed @ items.T + weights["reference"] * F.normalize(parts.reference, dim=-1) @ items.T
    )
    for term in ("caption", "prompt", "reference_description"):
        plain = plain + weights[term] * getattr(parts, term) @ description.T
    for term in space.terms():
        plain = plain + weights[term] * parts.attributes[term] @ attributes.T
    assert torch.allclose(fused, plain, atol=1e-5)


def test_items_without_descriptions_or_attributes_score_on_their_image(fused_model):
    model = fused_model
    image = torch.randn(2, model.backbone.feature_dim)
    vectors = model.item_vectors(image)
    assert torch.equal(
        vectors[:, model.backbone.feature_dim :], torch.zeros(2, model.matcher.dim + model.attribute_space.dim)
    )


def test_fusion_and_attribute_space_are_saved_and_old_matcher_weights_load_as_a_fusion(fused_model, tmp_path):
    fused_model.fusion = Fusion(composed=0.3, caption=0.2, attributes={"keep:color": 0.1})
    folder = fused_model.save(tmp_path / "model")
    loaded = CIRModel.load(folder)
    assert loaded.fusion == fused_model.fusion and loaded.attribute_space.names == fused_model.attribute_space.names
    meta = json.loads((folder / "model.json").read_text())
    meta.pop("fusion")
    meta["matcher"].update(template="prompt", weight=0.8)
    (folder / "model.json").write_text(json.dumps(meta))
    old = CIRModel.load(folder)
    assert old.fusion.weights() == pytest.approx({**Fusion(composed=0.2, prompt=0.8).weights()})


def test_every_effect_has_a_term_per_attribute():
    space = AttributeSpace()
    assert space.terms() == [f"{e}:{n}" for n in space.names for e in EFFECTS]
