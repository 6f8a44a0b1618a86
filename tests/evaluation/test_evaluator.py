"""The evaluator: its selection rule and figure, and its results cache (keyed by the model's
weights, the sets, the records and the options), one table per protocol and mode."""

from __future__ import annotations

import json

import pytest
import torch

from fashion_cir.data.catalog import read_attributes
from fashion_cir.data.triplets import load_triplet_set
from fashion_cir.errors import FashionCIRError
from fashion_cir.evaluation.evaluate import SPLIT, EvalOptions, Protocol, evaluate_sets
from fashion_cir.evaluation.evaluator import Evaluator, Selection
from fashion_cir.features.cache import FeatureCache
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.factory import create_backbone


@pytest.fixture(scope="module")
def setup(clothing_dir, tmp_path_factory):
    sets = {}
    for name in ("val", "other"):
        s = load_triplet_set(clothing_dir / "captions" / "cap.clothing.val.json",
                             clothing_dir / "image_splits" / "split.clothing.val.json", clothing_dir / "images", name=name)
        s.triplets = s.triplets[:40] if name == "val" else s.triplets[40:70]
        sets[name] = s
    return sets, FeatureCache(tmp_path_factory.mktemp("features")), read_attributes(clothing_dir / "attributes.jsonl")


def test_selection_figure_and_rule(setup):
    sets, cache, records = setup
    cirr = Protocol("cirr", remove_reference=True)
    evaluator = Evaluator(sets, cache, records, EvalOptions(progress=False), Selection(sets=["val"], metric="R@10"),
                          protocols=[SPLIT, cirr])
    report = evaluator(CIRModel(create_backbone("tiny:1"), query_mode="sum"))
    assert evaluator.figure(report, "sum") == pytest.approx((report["split"]["sum"]["val"]["R@10"]
                                                             + report["cirr"]["sum"]["val"]["R@10"]) / 2)
    everything = Evaluator(sets, cache, records, EvalOptions(progress=False), protocols=[SPLIT, cirr])
    expected = sum(report[p]["sum"][s]["overall"] for p in ("split", "cirr") for s in ("val", "other")) / 4
    assert everything.figure(report, "sum") == pytest.approx(expected)  # a mean over sets and protocols
    only_split = Evaluator(sets, cache, records, EvalOptions(progress=False), Selection(protocols=["split"]),
                           protocols=[SPLIT, cirr])
    assert only_split.figure(report, "sum") == pytest.approx(
        (report["split"]["sum"]["val"]["overall"] + report["split"]["sum"]["other"]["overall"]) / 2)
    assert Selection.best({"a": 1.0, "b": 3.0, "c": 3.0}) == "b"  # the earlier one on a tie
    assert Selection.improves(3.0, None) and Selection.improves(3.1, 3.0) and not Selection.improves(3.0, 3.0)
    with pytest.raises(FashionCIRError, match="selection names \\['nope'\\]"):
        Evaluator(sets, cache, records, selection=Selection(sets=["nope"]))


def test_results_cache_follows_the_weights(setup, tmp_path, monkeypatch):
    sets, cache, records = setup
    sets = {"val": sets["val"]}
    evaluator = Evaluator(sets, cache, records, EvalOptions(progress=False, keep_ranks=True), results_dir=tmp_path)
    model = CIRModel(create_backbone("tiny:2"), query_mode="sum")
    first = evaluator(model)
    assert len(list(tmp_path.glob("*.json"))) == 1
    assert evaluator(model) == first and len(list(tmp_path.glob("*.json"))) == 1  # served from the cache
    with torch.no_grad():  # other weights: a new result, never the cached one
        model.backbone.clip.text_projection.mul_(-1.0)
    changed = evaluator(model)
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert changed == evaluate_sets(model, sets, cache, EvalOptions(progress=False, keep_ranks=True), records)
    assert changed["split"]["sum"]["val"]["ranks"] != first["split"]["sum"]["val"]["ranks"]
    assert any(json.loads(p.read_text()) == first["split"]["sum"] for p in tmp_path.glob("*.json"))  # one table per file
    both = evaluator(model, ("image", "sum"))  # "sum" cached, "image" scored: one more file
    assert len(list(tmp_path.glob("*.json"))) == 3 and both["split"]["sum"] == changed["split"]["sum"]
    assert evaluator(model, ("image",)) == {"split": {"image": both["split"]["image"]}}
    assert len(list(tmp_path.glob("*.json"))) == 3
    # a request for reliance is not served by a table without it: scored again, in the same file
    relied = evaluator(model, ("image",), reliance=True)
    assert len(list(tmp_path.glob("*.json"))) == 3
    table = relied["split"]["image"]
    assert "reliance" in table["average"] and table["val"]["ranks"] == both["split"]["image"]["val"]["ranks"]
    assert table["val"]["reliance"] == pytest.approx(table["val"]["R@10"] - table["val"]["R@10_shuffled"])

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again; the cached table should have answered")

    monkeypatch.setattr(evaluator, "prepare", no_scoring)
    assert evaluator(model, ("image",)) == relied  # a table with reliance serves a request without it
    assert evaluator(model, ("image",), reliance=True) == relied
    other = Evaluator(sets, cache, records, EvalOptions(progress=False), results_dir=tmp_path)
    monkeypatch.setattr(other, "prepare", no_scoring)
    with pytest.raises(AssertionError, match="scored again"):  # another option (no ranks kept): another result
        other(model, ("image",))
    assert len(list(tmp_path.glob("*.json"))) == 3
