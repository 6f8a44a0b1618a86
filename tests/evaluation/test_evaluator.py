"""The evaluator: its selection rule and figure, its results cache (keyed by the model's weights,
the sets, the records and the options), one table per protocol and mode, and prepared sets that
score any fusion of the terms composed once (what fitting the fusion weights reads)."""

from __future__ import annotations

import json

import numpy as np
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
from fashion_cir.models.fusion import AttributeSpace, Fusion
from fashion_cir.models.matcher import DescriptionMatcher
from fashion_cir.training.fusion import FusionConfig, fit_fusion


@pytest.fixture(scope="module")
def setup(clothing_dir, tmp_path_factory):
    sets = {}
    for name in ("val", "other"):
        s = load_triplet_set(
            clothing_dir / "captions" / "cap.clothing.val.json",
            clothing_dir / "image_splits" / "split.clothing.val.json",
            clothing_dir / "images",
            name=name,
        )
        s.triplets = s.triplets[:40] if name == "val" else s.triplets[40:70]
        sets[name] = s
    return sets, FeatureCache(tmp_path_factory.mktemp("features")), read_attributes(clothing_dir / "attributes.jsonl")


def test_selection_figure_and_rule(setup):
    sets, cache, records = setup
    cirr = Protocol("cirr", remove_reference=True)
    evaluator = Evaluator(
        sets,
        cache,
        records,
        EvalOptions(progress=False),
        Selection(sets=["val"], metric="R@10"),
        protocols=[SPLIT, cirr],
    )
    report = evaluator(CIRModel(create_backbone("tiny:1"), query_mode="sum"))
    assert evaluator.figure(report, "sum") == pytest.approx(
        (report["split"]["sum"]["val"]["R@10"] + report["cirr"]["sum"]["val"]["R@10"]) / 2
    )
    everything = Evaluator(sets, cache, records, EvalOptions(progress=False), protocols=[SPLIT, cirr])
    expected = sum(report[p]["sum"][s]["overall"] for p in ("split", "cirr") for s in ("val", "other")) / 4
    assert everything.figure(report, "sum") == pytest.approx(expected)  # a mean over sets and protocols
    only_split = Evaluator(
        sets, cache, records, EvalOptions(progress=False), Selection(protocols=["split"]), protocols=[SPLIT, cirr]
    )
    assert only_split.figure(report, "sum") == pytest.approx(
        (report["split"]["sum"]["val"]["overall"] + report["split"]["sum"]["other"]["overall"]) / 2
    )
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
    assert any(
        json.loads(p.read_text()) == first["split"]["sum"] for p in tmp_path.glob("*.json")
    )  # one table per file
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


def test_prepared_sets_score_every_fusion_as_the_evaluator_does_and_the_fit_improves_on_composed(setup):
    """Replaces the matcher-weight calibration test: the terms are composed once (all of them), and
    any fusion's scores are the weighted sum of the term scores, with the metrics the evaluator
    gives a model carrying that fusion; fitting the weights on them beats the plain composed query."""
    sets, cache, records = setup
    model = CIRModel(
        create_backbone("tiny:3"), "sum", matcher=DescriptionMatcher("minilm"), attribute_space=AttributeSpace()
    )
    cirr = Protocol("cirr", remove_reference=True)
    evaluator = Evaluator(
        sets, cache, records, EvalOptions(progress=False), Selection(sets=["val"]), protocols=[SPLIT, cirr]
    )
    prepared = evaluator.prepare(model, all_terms=True)
    fusions = [
        Fusion(),
        Fusion(composed=0.5, caption=0.5),
        Fusion(
            composed=0.2,
            reference=0.1,
            prompt=0.5,
            reference_description=-0.1,
            attributes={"want:color": 0.3, "keep:category": 0.2, "away:color": -0.2},
        ),
    ]
    for fusion in fusions:
        model.fusion = fusion
        report = evaluator(model)  # composes only the terms this fusion weighs
        for protocol in ("split", "cirr"):
            for name, prepared_set in prepared.items():
                assert prepared_set.metrics(protocol, "sum", fusion) == report[protocol]["sum"][name], (
                    fusion,
                    protocol,
                )
                terms = prepared_set.term_scores(protocol, "sum")
                image_mode = prepared_set.term_scores(protocol, "image")  # the mode asked for, not the model's
                np.testing.assert_allclose(image_mode["composed"].numpy(), terms["reference"].numpy(), atol=1e-5)
                assert not np.allclose(terms["composed"].numpy(), terms["reference"].numpy(), atol=1e-3)
                assert {"composed", "reference", "caption", "prompt", "reference_description", "want:color"} <= set(
                    terms
                )
                by_hand = sum(fusion.weight(term) * scores for term, scores in terms.items())
                np.testing.assert_allclose(by_hand.numpy(), prepared_set.scores(protocol, "sum", fusion), atol=1e-5)
    fitted, summary = fit_fusion({"val": prepared["val"]}, "cirr", FusionConfig(steps=30))
    assert summary["loss"] < summary["loss_plain_composed"] and summary["queries"] == 40
    # the descriptions carry the caption's words; the random tiny image side does not
    assert (
        prepared["val"].metrics("cirr", "sum", fitted)["overall"]
        > prepared["val"].metrics("cirr", "sum", Fusion())["overall"]
    )
