"""End-to-end evaluation with the tiny model: the clothing val captions (real photos) and a small
FashionIQ-format set with missing, corrupt and out-of-gallery images."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fashion_cir.data.triplets import load_triplet_set
from fashion_cir.evaluation.evaluate import (
    SHUFFLE_SEED,
    SPLIT,
    EvalOptions,
    PreparedSet,
    Protocol,
    catalog_protocol,
    evaluate_sets,
    format_table,
    shuffled_order,
)
from fashion_cir.features.cache import FeatureCache

KS = (1, 5, 10, 50)


@pytest.fixture(scope="module")
def clothing_files(clothing_dir):
    return {
        "captions": clothing_dir / "captions" / "cap.clothing.val.json",
        "split": clothing_dir / "image_splits" / "split.clothing.val.json",
        "images": clothing_dir / "images",
    }


@pytest.fixture(scope="module")
def clothing(clothing_files):
    return load_triplet_set(clothing_files["captions"], clothing_files["split"], clothing_files["images"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return FeatureCache(tmp_path_factory.mktemp("features"))


def _stable_ranks(scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """Reference implementation: position of the target after a stable sort of -score."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.array(
        [np.where(order[q] == t)[0][0] if t >= 0 else np.iinfo(np.int64).max for q, t in enumerate(target_index)]
    )


def _near_ties(scores: np.ndarray, target_index: np.ndarray, tolerance: float = 1e-5) -> np.ndarray:
    """Per query, how many other items score within ``tolerance`` of its target (but not exactly
    the same): where float32 scoring (the evaluation's) may order them otherwise than float64."""
    target = scores[np.arange(len(scores)), target_index][:, None]
    return ((np.abs(scores - target) < tolerance) & (scores != target)).sum(1)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _hand_query_text(captions: list[str]) -> str:
    """CLIP4Cir's FashionIQ validation joining, written out here: c1 stripped of '.?, ' and
    capitalised (str.capitalize), " and ", c2 stripped."""
    first, second = (c.strip(".?, ") for c in captions)
    return f"{first.capitalize()} and {second}"


def test_clothing_val_end_to_end(tiny_model, clothing, cache):
    assert clothing.report() == {
        "triplets": 240,
        "gallery_images": 563,
        "missing_images": 0,
        "skipped_triplets": 0,
        "duplicate_gallery_ids": 0,
    }
    options = EvalOptions(modes=("image", "text", "sum", "sum_raw"), ks=KS, progress=False)
    full = evaluate_sets(tiny_model, {"clothing": clothing}, cache, options)
    assert list(full) == ["split"]
    report = full["split"]
    assert set(report) == set(options.modes)
    for mode, table in report.items():
        metrics = table["clothing"]
        assert metrics["n_queries"] == 240 and metrics["n_gallery"] == 563 and metrics["missing"] == 0
        values = [metrics[f"R@{k}"] for k in KS]
        assert all(0.0 <= v <= 100.0 for v in values), (mode, values)
        assert values == sorted(values), f"R@K not monotonic in K for {mode}: {values}"
        for v in values:  # each recall is a count out of 240 queries
            assert abs(v * 240 / 100 - round(v * 240 / 100)) < 1e-6
        average = table["average"]
        assert average["overall"] == pytest.approx((average["R@10"] + average["R@50"]) / 2)
        assert average["R@10"] == metrics["R@10"]
    # the reference stays in the FashionIQ gallery: in image-only mode it is found instead of the target
    assert report["image"]["clothing"]["R@1"] < 10.0
    text = format_table(full, KS)
    assert "clothing" in text and "average" in text and len(text.splitlines()) == 2 + 2 * len(options.modes)


def test_clothing_ranks_match_a_stable_sort_and_reference_removal_only_helps(
    tiny_model, clothing, clothing_files, cache
):
    options = EvalOptions(modes=("image", "sum"), ks=KS, progress=False)
    cirr = Protocol("cirr", remove_reference=True)
    both = evaluate_sets(tiny_model, {"c": clothing}, cache, options, protocols=[SPLIT, cirr])
    assert cache.last_stats.computed == 0  # gallery features reused from the first test (same module)
    keep = {mode: table["c"] for mode, table in both["split"].items()}
    removed = {mode: table["c"] for mode, table in both["cirr"].items()}
    alone = evaluate_sets(tiny_model, {"c": clothing}, cache, options, protocols=[cirr])["cirr"]
    assert {mode: table["c"] for mode, table in alone.items()} == removed  # one pass for two protocols changes nothing
    # independent recomputation from the cached features: query texts joined and queries composed
    # here, from the captions file itself (no project code besides the encoders)
    ids, gallery = cache.encode(
        tiny_model.backbone, {i: clothing.image_paths[i] for i in clothing.gallery_ids}, progress=False
    )
    raw = json.loads(clothing_files["captions"].read_text())
    assert [(r["candidate"], r["target"]) for r in raw] == [(t.candidate, t.target) for t in clothing.triplets]
    position = {i: n for n, i in enumerate(ids)}
    image = gallery[[position[r["candidate"]] for r in raw]].astype(np.float64)
    text = tiny_model.backbone.embed_texts([_hand_query_text(r["captions"]) for r in raw]).numpy().astype(np.float64)
    assert np.linalg.norm(text, axis=1).std() > 1e-3  # text features are not unit length: normalising matters
    gallery_norm = _unit(gallery.astype(np.float64))
    targets = np.array([position[r["target"]] for r in raw])
    references = np.array([position[r["candidate"]] for r in raw])
    queries = {"image": _unit(image), "sum": _unit(_unit(image) + _unit(text))}
    for mode in ("image", "sum"):
        scores = queries[mode] @ gallery_norm.T
        ranks = _stable_ranks(scores, targets)
        for k in KS:
            assert keep[mode][f"R@{k}"] == pytest.approx(100.0 * (ranks < k).mean())
        without_ref = scores.copy()
        without_ref[np.arange(len(references)), references] = -np.inf
        ranks_removed = _stable_ranks(without_ref, targets)
        for k in KS:
            assert removed[mode][f"R@{k}"] == pytest.approx(100.0 * (ranks_removed < k).mean())
            assert removed[mode][f"R@{k}"] >= keep[mode][f"R@{k}"]
    assert removed["image"]["R@1"] > keep["image"]["R@1"]


def test_partial_fashioniq_style_set(tiny_model, tmp_path, make_jpeg, cache):
    """Missing images are skipped and counted, a corrupt gallery image does not stop the run, and
    a target that exists outside the split is never retrieved."""
    images = tmp_path / "images"
    for n in range(12):
        make_jpeg(images / f"g{n}.jpg", size=(40 + 4 * n, 60), seed=100 + n)
    make_jpeg(images / "outside.jpg", seed=7)  # an image that is not in the split
    (images / "g11.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    triplets = [
        {"candidate": f"g{n}", "target": f"g{n + 1}", "captions": ["is darker", "has stripes"]} for n in range(8)
    ]
    triplets += [
        {"candidate": "g0", "target": "outside", "captions": ["is another one"]},  # target not in gallery
        {"candidate": "g1", "target": "lost", "captions": ["x"]},  # image file missing -> skipped
        {"candidate": "g11", "target": "g2", "captions": ["x"]},  # corrupt reference -> unusable
        {"candidate": "g3", "target": "g11", "captions": ["x"]},  # corrupt target -> unusable
    ]
    (tmp_path / "cap.json").write_text(json.dumps(triplets))
    (tmp_path / "split.json").write_text(json.dumps([f"g{n}" for n in range(12)] + ["g3", "absent"]))
    ts = load_triplet_set(tmp_path / "cap.json", tmp_path / "split.json", images)
    assert (
        ts.duplicate_gallery_ids == 1 and ts.skipped_triplets == 1 and sorted(ts.missing_images) == ["absent", "lost"]
    )
    options = EvalOptions(modes=("sum",), ks=(1, 5, 50, 100), progress=False)
    metrics = evaluate_sets(tiny_model, {"ts": ts}, cache, options)["split"]["sum"]["ts"]
    assert metrics["n_gallery"] == 11  # g11 failed to decode
    assert metrics["n_queries"] == 9  # 12 triplets - 1 skipped (missing file) - 2 unusable (corrupt reference, target)
    assert metrics["skipped_triplets"] == 3
    assert metrics["missing"] == 2 + 1  # missing files + the image that failed to decode
    # 8 queries have their target in the 11-image gallery; 'outside' is never retrieved,
    # even at K = 50 or 100, more than the gallery holds
    assert metrics["R@50"] == metrics["R@100"] == pytest.approx(800 / 9)
    kept = PreparedSet(tiny_model, ts, cache, options).triplets  # which 9: a target outside the split stays
    assert [(t.candidate, t.target) for t in kept] == [(f"g{n}", f"g{n + 1}") for n in range(8)] + [("g0", "outside")]
    empty = PreparedSet(
        tiny_model, dataclasses.replace(ts, triplets=[]), cache, EvalOptions(progress=False, reliance=True)
    )
    assert empty.ranks("split").shape == (0,) and empty.ranks("split", shuffled=True).shape == (0,)
    assert empty.metrics("split")["n_queries"] == 0


def test_catalog_protocol_and_reliance_by_hand(tiny_model, clothing, clothing_files, cache):
    """The catalog protocol ranks a larger gallery with the reference removed; reliance ranks the
    same captions and targets with the references of a fixed permutation."""
    extra = json.loads((clothing_files["split"].parent / "split.clothing.train.json").read_text())[:300]
    gallery = tuple(clothing.gallery_ids) + tuple(extra)
    clothing_all = load_triplet_set(clothing_files["captions"], clothing_files["split"], clothing_files["images"])
    clothing_all.image_paths.update({i: clothing_files["images"] / f"{i}.jpg" for i in extra})
    options = EvalOptions(modes=("image",), ks=KS, progress=False, keep_ranks=True, reliance=True)
    metrics = evaluate_sets(tiny_model, {"c": clothing_all}, cache, options, protocols=[catalog_protocol(gallery)])
    metrics = metrics["catalog"]["image"]["c"]
    ids, features = cache.encode(tiny_model.backbone, {i: clothing_all.image_paths[i] for i in gallery}, progress=False)
    assert ids == list(gallery) and metrics["n_gallery"] == len(gallery)
    position = {i: n for n, i in enumerate(ids)}
    unit = _unit(features.astype(np.float64))
    raw = json.loads(clothing_files["captions"].read_text())
    order = shuffled_order(len(raw))
    assert sorted(order) == list(range(len(raw))) and not any(order == np.arange(len(raw)))
    for shown, key in (
        ([r["candidate"] for r in raw], "ranks"),
        ([raw[i]["candidate"] for i in order], "ranks_shuffled"),
    ):
        scores = unit[[position[i] for i in shown]] @ unit.T
        for row, (reference, r) in enumerate(zip(shown, raw)):
            if reference != r["target"]:
                scores[row, position[reference]] = -np.inf  # the shown reference leaves the gallery
        targets = np.array([position[r["target"]] for r in raw])
        ranks = _stable_ranks(scores, targets)
        # equal, except that an item within float32 rounding of the target may fall on either side of it
        slack = _near_ties(scores, targets)
        assert all(abs(ours - theirs) <= near for ours, theirs, near in zip(metrics[key], ranks.tolist(), slack)), key
        assert sum(ours != theirs for ours, theirs in zip(metrics[key], ranks.tolist())) <= 2, key
    assert metrics["reliance"] == pytest.approx(metrics["R@10"] - metrics["R@10_shuffled"])


def test_the_shuffled_order_is_one_fixed_cycle():
    """Every query is shown another query's reference: the permutation is one cycle through all n
    queries (not several shorter ones), the same for a seed, another for another seed."""
    for n in (2, 5, 6, 240):
        order = shuffled_order(n)
        seen, at = [], 0
        while at not in seen:
            seen.append(at)
            at = int(order[at])
        assert len(seen) == n and sorted(order.tolist()) == list(range(n))
        np.testing.assert_array_equal(order, shuffled_order(n))
    assert shuffled_order(240, seed=1).tolist() != shuffled_order(240).tolist()
    cycle = np.random.default_rng(SHUFFLE_SEED).permutation(7)  # each query shows the next one's reference
    assert [int(shuffled_order(7)[cycle[i]]) for i in range(7)] == [int(cycle[(i + 1) % 7]) for i in range(7)]


def test_the_text_table_by_hand():
    report = {
        "split": {"sum": {"annotated-val": {"R@1": 12.5, "R@10": 50.0, "n_queries": 8, "n_gallery": 20, "missing": 0}}},
        "catalog": {
            "text": {"minpairs-val": {"R@1": 0.0, "R@10": 100.0, "n_queries": 200, "n_gallery": 5756, "missing": 3}}
        },
    }
    header = "protocol  mode      set" + " " * 18 + "R@1    R@10  queries  gallery  missing"
    assert format_table(report, ks=(1, 10)).split("\n") == [
        header,
        "-" * len(header),
        "split     sum       annotated-val      12.50   50.00        8       20        0",
        "catalog   text      minpairs-val        0.00  100.00      200     5756        3",
    ]


def test_reference_columns_are_the_true_references_also_when_reliance_is_measured(tiny_model, clothing, cache):
    """What the fusion fit removes from each query's gallery is its own reference, never the shuffled
    one that reliance shows it (the same prepared set holds both); a protocol that keeps the
    reference removes none."""
    gallery = tuple(clothing.gallery_ids)
    options = EvalOptions(modes=("image",), progress=False, reliance=True)
    prepared = PreparedSet(tiny_model, clothing, cache, options, protocols=[SPLIT, catalog_protocol(gallery)])
    column = {image_id: c for c, image_id in enumerate(gallery)}
    by_hand = [column[t.candidate] for t in prepared.triplets]
    assert prepared.reference_columns("catalog").tolist() == by_hand
    assert [prepared.triplets[i].candidate for i in prepared.shuffle] != [t.candidate for t in prepared.triplets]
    assert prepared.reference_columns("split") is None


def test_a_model_that_reads_descriptions_scores_as_its_queries_composed_one_by_one(
    tmp_path, clothing, clothing_dir, cache
):
    """The three-block model ([image | description | attributes]) on real captions: each query
    composed alone from its reference's catalog record (or the triplet's own reference prompt) and
    scored against the rows an index stores for the gallery gives the prepared set's ranks, under
    the split protocol and under a catalog protocol whose gallery lacks some references (those
    stay); shuffled references take the shown reference's record, never the prompt."""
    from fashion_cir.data.captions import join_captions_val
    from fashion_cir.data.catalog import read_attributes
    from fashion_cir.retrieval import build_index
    from fashion_cir.retrieval.store import item_vectors
    from support.matcher import multi_block_model

    model = multi_block_model(tmp_path / "encoder")
    records = read_attributes(clothing_dir / "attributes.jsonl")
    triplets = clothing.triplets[:24]
    prompted = {0: "a plain white cotton shirt", 5: "a pair of black leather boots"}
    triplets = [
        dataclasses.replace(t, extra={**t.extra, "reference_prompt": prompted[n]}) if n in prompted else t
        for n, t in enumerate(triplets)
    ]
    subset = dataclasses.replace(clothing, triplets=triplets)
    gallery = list(clothing.gallery_ids)
    target_ids = {t.target for t in triplets}
    lacking = [n for n, t in enumerate(triplets) if t.candidate not in target_ids][:2]
    missing = {triplets[n].candidate for n in lacking}  # references the catalog protocol's gallery lacks
    catalog = catalog_protocol(tuple(i for i in gallery if i not in missing))
    options = EvalOptions(progress=False, reliance=True)
    prepared = PreparedSet(model, subset, cache, options, records=records, protocols=[SPLIT, catalog])
    assert len(prepared.triplets) == 24 and prepared.reference_columns("catalog")[lacking].tolist() == [-1, -1]
    index = build_index(
        tmp_path / "index",
        model,
        {i: clothing.image_paths[i] for i in gallery},
        records,
        cache_dir=cache.root,
        progress=False,
    )
    rows = index.stored_rows(gallery)
    items = item_vectors(rows, index.config).astype(np.float64)
    dim = int(index.config["feature_dim"])
    position = {i: n for n, i in enumerate(gallery)}
    for shuffled in (False, True):
        shown = [t.candidate for t in triplets]
        if shuffled:
            shown = [shown[i] for i in prepared.shuffle]
        queries = []
        for t, reference in zip(triplets, shown):
            description = (
                t.reference_prompt if not shuffled and t.reference_prompt else records[reference]["description"]
            )
            image = torch.from_numpy(rows[[position[reference]], :dim])
            parts = model.encode_queries(
                image, [join_captions_val(list(t.captions))], [description], [records[reference]]
            )
            queries.append(model.query_vectors(parts)[0].double().numpy())
        targets = np.array([position[t.target] for t in triplets])
        for protocol in ("split", "catalog"):
            columns = [position[i] for i in (gallery if protocol == "split" else catalog.gallery_ids)]
            scores = np.stack(queries) @ items[columns].T
            column = {row: c for c, row in enumerate(columns)}
            if protocol == "catalog":
                for q, reference in enumerate(shown):
                    if position[reference] in column and reference != triplets[q].target:
                        scores[q, column[position[reference]]] = -np.inf
            want = _stable_ranks(scores, np.array([column[r] for r in targets]))
            got = prepared.ranks(protocol, shuffled=shuffled)
            slack = _near_ties(scores, np.array([column[r] for r in targets]), tolerance=2e-3)
            assert all(abs(a - b) <= s for a, b, s in zip(got.tolist(), want.tolist(), slack)), (protocol, shuffled)
            assert sum(a != b for a, b in zip(got.tolist(), want.tolist())) <= 3, (protocol, shuffled)
