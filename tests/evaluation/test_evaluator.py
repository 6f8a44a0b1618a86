"""The evaluator: its selection figure, its results cache (keyed by the model's weights, the sets
and the options) and the matcher-weight calibration that composes queries once."""

from __future__ import annotations

import json

import pytest
import torch

from fashion_cir.data.triplets import load_triplet_set
from fashion_cir.errors import FashionCIRError
from fashion_cir.evaluation.evaluate import EvalOptions, evaluate_sets
from fashion_cir.evaluation.evaluator import Evaluator, Selection
from fashion_cir.features.cache import FeatureCache
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.factory import create_backbone
from fashion_cir.models.matcher import DescriptionMatcher


@pytest.fixture(scope="module")
def setup(clothing_dir, tmp_path_factory):
    val = load_triplet_set(clothing_dir / "captions" / "cap.clothing.val.json",
                           clothing_dir / "image_splits" / "split.clothing.val.json", clothing_dir / "images", name="val")
    val.triplets = val.triplets[:40]
    from fashion_cir.data.catalog import read_descriptions

    descriptions = read_descriptions(clothing_dir / "attributes.jsonl")
    return {"val": val}, FeatureCache(tmp_path_factory.mktemp("features")), descriptions


def test_primary_figure_and_selection(setup):
    sets, cache, descriptions = setup
    evaluator = Evaluator(sets, cache, descriptions, EvalOptions(progress=False), Selection(set="val", metric="R@10"))
    table = evaluator(CIRModel(create_backbone("tiny:1"), query_mode="sum"))["sum"]
    assert evaluator.primary(table) == table["val"]["R@10"]
    assert Evaluator(sets, cache, descriptions, EvalOptions(progress=False)).primary(table) == table["average"]["overall"]
    assert table["val"]["overall"] == (table["val"]["R@10"] + table["val"]["R@50"]) / 2
    assert Evaluator.select({"a": 1.0, "b": 3.0, "c": 3.0}) == "b"  # the earlier one on a tie
    with pytest.raises(FashionCIRError, match="selection set 'nope'"):
        Evaluator(sets, cache, descriptions, selection=Selection(set="nope"))


def test_results_cache_follows_the_weights(setup, tmp_path):
    sets, cache, descriptions = setup
    evaluator = Evaluator(sets, cache, descriptions, EvalOptions(progress=False, keep_ranks=True), results_dir=tmp_path)
    model = CIRModel(create_backbone("tiny:2"), query_mode="sum")
    first = evaluator(model)
    assert len(list(tmp_path.glob("*.json"))) == 1
    assert evaluator(model) == first and len(list(tmp_path.glob("*.json"))) == 1  # served from the cache
    with torch.no_grad():  # other weights: a new result, never the cached one
        model.backbone.clip.text_projection.mul_(-1.0)
    changed = evaluator(model)
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert changed == evaluate_sets(model, sets, cache, EvalOptions(progress=False, keep_ranks=True), descriptions)
    assert changed["sum"]["val"]["ranks"] != first["sum"]["val"]["ranks"]
    assert any(json.loads(p.read_text()) == first["sum"] for p in tmp_path.glob("*.json"))  # one table per file
    both = evaluator(model, ("image", "sum"))  # "sum" cached, "image" scored: one more file
    assert len(list(tmp_path.glob("*.json"))) == 3 and both["sum"] == changed["sum"]
    assert evaluator(model, ("image",)) == {"image": both["image"]} and len(list(tmp_path.glob("*.json"))) == 3


def test_calibration_matches_scoring_each_weight(setup):
    sets, cache, descriptions = setup
    model = CIRModel(create_backbone("tiny:3"), query_mode="sum", text_template="prompt", matcher=DescriptionMatcher("minilm"))
    evaluator = Evaluator(sets, cache, descriptions, EvalOptions(progress=False), Selection(set="val"))
    weights = [0.0, 0.5, 0.9, 1.0]
    scores = evaluator.calibrate(model, weights)
    assert model.matcher.weight == 0.5  # left as it was
    for weight in weights:
        model.matcher.weight = weight
        assert scores[weight] == pytest.approx(evaluator.primary(evaluator(model)["sum"]))
    assert scores[1.0] > scores[0.0]  # the descriptions carry the caption's words; the random tiny image side does not
