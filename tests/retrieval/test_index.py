"""The catalog index: build/save/load, fingerprint checks, incremental add, FAISS factories,
atomic saves and composed search."""

from __future__ import annotations

import json
import re

import faiss
import numpy as np
import pytest
from PIL import Image

from fashion_cir.data.metadata import read_metadata
from fashion_cir.errors import DataError, ModelError
from fashion_cir.models.cir import CIRModel, load_model
from fashion_cir.retrieval import CatalogIndex, add_to_index, build_index, load_catalog, search
from support.serving import synthetic_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return synthetic_catalog(tmp_path_factory.mktemp("catalog") / "images", 60)


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, tiny_model, catalog):
    paths, metadata = catalog
    return build_index(tmp_path_factory.mktemp("flat") / "index", tiny_model, paths, metadata, progress=False)


def counting_model() -> tuple[CIRModel, list[int]]:
    """A fresh tiny model whose image encoder records how many images it encodes."""
    model = load_model(backbone="tiny")
    counts: list[int] = []
    encode = model.backbone.encode_image_trunk

    def counted(pixels):
        counts.append(len(pixels))
        return encode(pixels)

    model.backbone.encode_image_trunk = counted
    return model, counts


def test_round_trip(flat_index, tiny_model, catalog):
    paths, metadata = catalog
    loaded = CatalogIndex.load(flat_index.folder, tiny_model)
    assert loaded.ids == list(paths) and len(loaded) == 60
    assert loaded.metadata["item-003"] == metadata["item-003"]
    assert loaded.paths["item-003"] == paths["item-003"].resolve()
    np.testing.assert_array_equal(loaded.features, flat_index.features)
    assert loaded.config["image_fingerprint"] == tiny_model.backbone.image_fingerprint()
    assert loaded.config["backbone"] == "tiny:0" and loaded.config["factory"] == "Flat"
    before = search(tiny_model, flat_index, item_id="item-007", text="is blue", k=5)
    after = search(tiny_model, loaded, item_id="item-007", text="is blue", k=5)
    assert [(h.id, round(h.score, 5)) for h in before] == [(h.id, round(h.score, 5)) for h in after]
    assert flat_index.report["added"] == 60 and flat_index.report["failed"] == 0


def test_existing_index_is_not_overwritten_silently(flat_index, tiny_model, catalog):
    with pytest.raises(DataError, match="already exists"):
        build_index(flat_index.folder, tiny_model, catalog[0], progress=False)


def test_fingerprint_mismatch_is_refused(flat_index, catalog):
    other = load_model(backbone="tiny:1")
    with pytest.raises(ModelError, match="fingerprint .* tiny:1"):
        CatalogIndex.load(flat_index.folder, other)
    with pytest.raises(ModelError, match="rebuild the index"):
        add_to_index(flat_index.folder, other, catalog[0], progress=False)


def test_not_an_index_folder(tmp_path, tiny_model):
    with pytest.raises(DataError, match="not a fashion-cir index folder"):
        CatalogIndex.load(tmp_path, tiny_model)


def test_incremental_add_encodes_only_new_images(tmp_path, catalog):
    paths, metadata = catalog
    model, counts = counting_model()
    folder = tmp_path / "index"
    first = dict(list(paths.items())[:40])
    build_index(folder, model, first, metadata, progress=False)
    assert sum(counts) == 40
    counts.clear()
    # a separate feature cache, so that nothing old could be reused from it
    index = add_to_index(folder, model, paths, metadata, cache_dir=tmp_path / "other-cache", progress=False)
    assert sum(counts) == 20
    assert index.report["already_indexed"] == 40 and index.report["added"] == 20
    loaded = CatalogIndex.load(folder, model)
    assert loaded.ids == list(paths) and loaded.faiss_index.ntotal == 60
    assert loaded.metadata["item-055"]["description"] == metadata["item-055"]["description"]
    assert search(model, loaded, item_id="item-055", k=1)[0].id == "item-055"
    counts.clear()
    data_folder = loaded.config["data"]
    again = add_to_index(folder, model, paths, metadata, progress=False)
    assert sum(counts) == 0 and again.report["added"] == 0
    assert CatalogIndex.load(folder).config["data"] == data_folder  # nothing rewritten


def test_failed_save_keeps_previous_index(tmp_path, tiny_model, catalog, monkeypatch):
    paths, metadata = catalog
    folder = tmp_path / "index"
    build_index(folder, tiny_model, dict(list(paths.items())[:30]), metadata, progress=False)

    def broken_write(index, path):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(OSError, match="disk full"):
        add_to_index(folder, tiny_model, paths, metadata, progress=False)
    monkeypatch.undo()
    index = CatalogIndex.load(folder, tiny_model)
    assert len(index) == 30
    assert len(add_to_index(folder, tiny_model, paths, metadata, progress=False)) == 60
    assert [p.name for p in folder.glob("data-*")] == [CatalogIndex.load(folder).config["data"]]


def test_unreadable_images_are_skipped_and_reported(tmp_path, tiny_model, catalog):
    paths = dict(list(catalog[0].items())[:10])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(paths["item-000"].read_bytes()[:200])
    paths["broken"] = broken
    index = build_index(tmp_path / "index", tiny_model, paths, progress=False)
    assert len(index) == 10 and "broken" not in index
    assert index.report["failed"] == 1 and list(index.report["failures"]) == ["broken"]
    assert "broken.jpg: corrupt or truncated image" in index.report["failures"]["broken"]


@pytest.mark.parametrize("factory, min_recall", [("IVF4,Flat", 1.0), ("HNSW16", 0.9)])
def test_approximate_factories_against_exact(tmp_path, tiny_model, catalog, flat_index, factory, min_recall):
    paths, metadata = catalog
    index = build_index(tmp_path / "index", tiny_model, paths, metadata, factory=factory, progress=False)
    loaded = CatalogIndex.load(tmp_path / "index", tiny_model)
    assert loaded.config["factory"] == factory
    queries = flat_index.features[::3] / np.linalg.norm(flat_index.features[::3], axis=1, keepdims=True)
    recalls = []
    for exact, approx in zip(flat_index.search_vectors(queries, 10), loaded.search_vectors(queries, 10)):
        recalls.append(len({h.id for h in exact} & {h.id for h in approx}) / 10)
    assert np.mean(recalls) >= min_recall  # IVF with nprobe >= nlist scans every list: exact
    assert index.report["added"] == 60


def test_bad_factories_are_explained(tmp_path, tiny_model, catalog):
    paths = dict(list(catalog[0].items())[:20])
    with pytest.raises(DataError, match="has 256 lists but the catalog has only 20"):
        build_index(tmp_path / "a", tiny_model, paths, factory="IVF256,Flat", progress=False)
    with pytest.raises(DataError, match="bad FAISS factory string"):
        build_index(tmp_path / "b", tiny_model, paths, factory="NoSuchIndex", progress=False)


def test_search_with_own_features_ranks_the_item_first(flat_index, tiny_model, catalog):
    paths, _ = catalog
    image_only = CIRModel(tiny_model.backbone, query_mode="image")
    for image_id in ["item-000", "item-013", "item-027", "item-059"]:
        for model, text in [(tiny_model, ""), (image_only, "is red with long sleeves")]:
            hits = search(model, flat_index, item_id=image_id, text=text, k=5)
            assert hits[0].id == image_id and hits[0].score == pytest.approx(1.0, abs=1e-3)
        uploaded = search(tiny_model, flat_index, image=Image.open(paths[image_id]), k=3)
        assert uploaded[0].id == image_id
    excluded = search(tiny_model, flat_index, item_id="item-013", k=59, exclude_reference=True)
    assert len(excluded) == 59 and "item-013" not in {h.id for h in excluded}
    assert [h.score for h in excluded] == sorted((h.score for h in excluded), reverse=True)


def test_search_composes_with_the_reference_description(flat_index, tiny_model, monkeypatch):
    seen: list[str] = []
    embed = tiny_model.backbone.embed_texts
    monkeypatch.setattr(tiny_model.backbone, "embed_texts", lambda texts, *args, **kw: seen.extend(texts) or embed(texts, *args, **kw))
    hits = search(tiny_model, flat_index, item_id="item-001", text="Is green", k=3)
    assert seen == ["a blue t-shirt, but is green"]
    assert len(hits) == 3 and hits[0].metadata == flat_index.metadata[hits[0].id]
    text_only = search(tiny_model, flat_index, text="a red dress", k=60)
    assert len(text_only) == 60 and seen[-1] == "a red dress"
    with pytest.raises(DataError, match="unknown catalog id"):
        search(tiny_model, flat_index, item_id="nope", text="x")
    with pytest.raises(DataError, match="needs a reference"):
        search(tiny_model, flat_index, text="  ")


def test_catalog_from_folder_and_metadata_files(tmp_path, catalog):
    paths, metadata = catalog
    folder = paths["item-000"].parent
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("image,label\nitem-000,T-Shirt\nitem-001,Dress\n", encoding="utf-8")
    jsonl_file = tmp_path / "attributes.jsonl"
    jsonl_file.write_text(json.dumps({"image": "item-001", "description": "a blue t-shirt"}) + "\n", encoding="utf-8")
    found, meta = load_catalog(folder, [csv_file, jsonl_file])
    assert list(found) == sorted(paths) and meta["item-001"] == {"label": "Dress", "description": "a blue t-shirt"}
    assert meta["item-002"] == {}
    subset, _ = load_catalog(folder, ids=["item-002", "item-000"])
    assert list(subset) == ["item-002", "item-000"]
    with pytest.raises(DataError, match="have no image"):
        load_catalog(folder, ids=["missing"])
    bad = tmp_path / "bad.csv"
    bad.write_text("name\nx\n", encoding="utf-8")
    with pytest.raises(DataError, match="no 'image' or 'id' field"):
        read_metadata(bad)


def test_serving_defaults_to_the_trained_model_the_index_was_built_with(tmp_path, catalog):
    """An index built from a model folder is served with that model (its trained text side and
    query mode), not with the zero-shot backbone it shares an image encoder with."""
    import torch

    from fashion_cir.serving.app import create_app

    trained = load_model(backbone="tiny", query_mode="text")
    with torch.no_grad():
        trained.backbone.clip.text_projection.mul_(-1)
    trained.mark_trained(["backbone.clip.text_projection"])
    trained.save(tmp_path / "model")
    model = CIRModel.load(tmp_path / "model")
    paths, metadata = catalog
    build_index(tmp_path / "index", model, paths, metadata, progress=False)
    served = create_app(tmp_path / "index").state.model
    assert served.source == (tmp_path / "model").resolve() and served.query_mode == "text"
    torch.testing.assert_close(served.backbone.embed_texts(["a red dress"]), model.backbone.embed_texts(["a red dress"]))


def test_manifest_and_data_fields_are_checked_on_open(tmp_path, flat_index):
    """Issue 22 item 9: manifest fields were trusted on open (root "/" let a tampered paths.json
    reach any image on disk), and nested JSON in index.json or metadata.json was a traceback."""
    import shutil

    from fashion_cir.retrieval.manifest import catalog_root

    folder = tmp_path / "index"
    shutil.copytree(flat_index.folder, folder)
    good = json.loads((folder / "index.json").read_text())
    bad_manifests = [({"root": "/"}, "field 'root' must be the absolute folder of the catalog images, not '/'"),
                     ({"root": "//"}, "not '//'"), ({"root": "catalog"}, "not 'catalog'"),
                     ({"fields": ["color", "a) or (b"]}, "field 'fields' must list metadata field names"),
                     ({"store": ["faiss"]}, "field 'store' must be an object naming its kind")]
    for change, message in bad_manifests:
        (folder / "index.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(DataError, match=re.escape(message)):
            CatalogIndex.load(folder)
    (folder / "index.json").write_text(json.dumps(good))
    metadata = folder / good["data"] / "metadata.json"
    metadata.write_text('{"item-000": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(DataError) as error:
        CatalogIndex.load(folder)
    assert str(error.value) == f"malformed index metadata {metadata}: nested too deeply"
    with pytest.raises(DataError, match=r"share no folder below the filesystem root \(/a and /b\)"):
        catalog_root(["/a/x.jpg", "/b/y.jpg"])
    assert catalog_root(["/a/b/x.jpg", "/a/c/y.jpg"]) == "/a"
