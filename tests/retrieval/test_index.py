"""The catalog index: build/save/load, fingerprint checks, incremental add, FAISS factories,
atomic saves and composed search; file modes, corrupt and hostile index folders (one line naming
the file), paths confined to the catalog root, and concurrent adds that take turns."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fashion_cir.cli import app
from fashion_cir.data.metadata import read_metadata
from fashion_cir.errors import DataError, ModelError
from fashion_cir.models.cir import CIRModel, load_model
from fashion_cir.retrieval import (
    CatalogIndex,
    add_to_index,
    build_index,
    load_catalog,
    remove_from_index,
    search,
)
from support.serving import synthetic_catalog

runner = CliRunner()


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
    monkeypatch.setattr(
        tiny_model.backbone, "embed_texts", lambda texts, *args, **kw: seen.extend(texts) or embed(texts, *args, **kw)
    )
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
    torch.testing.assert_close(
        served.backbone.embed_texts(["a red dress"]), model.backbone.embed_texts(["a red dress"])
    )


def test_manifest_and_data_fields_are_checked_on_open(tmp_path, flat_index):
    """Issue 22 item 9: manifest fields were trusted on open (root "/" let a tampered paths.json
    reach any image on disk), and nested JSON in index.json or metadata.json was a traceback."""
    import shutil

    from fashion_cir.retrieval.manifest import catalog_root

    folder = tmp_path / "index"
    shutil.copytree(flat_index.folder, folder)
    good = json.loads((folder / "index.json").read_text())
    bad_manifests = [
        ({"root": "/"}, "field 'root' must be the absolute folder of the catalog images, not '/'"),
        ({"root": "//"}, "not '//'"),
        ({"root": "catalog"}, "not 'catalog'"),
        ({"fields": ["color", "a) or (b"]}, "field 'fields' must list metadata field names"),
        ({"store": ["faiss"]}, "field 'store' must be an object naming its kind"),
    ]
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


# -- file modes, corrupt and hostile index folders, concurrent adds (issue 12) --
def test_index_files_are_readable_by_others_under_a_022_umask(tmp_path, tiny_model, drawings):
    old = os.umask(0o022)
    try:
        index = build_index(tmp_path / "index", tiny_model, dict(list(drawings[0].items())[:4]), progress=False)
    finally:
        os.umask(old)
    files = [index.folder / "index.json", *(index.folder / index.config["data"]).iterdir()]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o644}


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_model, drawings):
    return build_index(
        tmp_path_factory.mktemp("small") / "index",
        tiny_model,
        dict(list(drawings[0].items())[:8]),
        drawings[1],
        progress=False,
    ).folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def _set_manifest(folder: Path, **changes) -> None:
    manifest = _manifest(folder)
    for key, value in changes.items():
        if value is KeyError:
            manifest.pop(key)
        else:
            manifest[key] = value
    (folder / "index.json").write_text(json.dumps(manifest))


def _data(folder: Path) -> Path:
    return folder / _manifest(folder)["data"]


CORRUPTIONS = {
    "truncated features.npy": (
        lambda f: (_data(f) / "features.npy").write_bytes((_data(f) / "features.npy").read_bytes()[:150]),
        "features.npy",
    ),
    "empty features.npy": (lambda f: (_data(f) / "features.npy").write_bytes(b""), "features.npy"),
    "features.npy of the wrong dimension": (
        lambda f: np.save(_data(f) / "features.npy", np.zeros((8, 33), np.float32)),
        "features.npy",
    ),
    "features.npy of the wrong length": (
        lambda f: np.save(_data(f) / "features.npy", np.zeros((7, 32), np.float32)),
        "features.npy",
    ),
    "manifest without count": (lambda f: _set_manifest(f, count=KeyError), "index.json"),
    "manifest without nprobe": (lambda f: _set_manifest(f, nprobe=KeyError), "index.json"),
    "manifest with feature_dim wrong": (
        lambda f: _set_manifest(f, feature_dim=64, blocks={"image": 64}),
        "features.npy",
    ),
    "manifest whose blocks disagree with feature_dim": (lambda f: _set_manifest(f, feature_dim=64), "index.json"),
    "manifest with a block of no width": (
        lambda f: _set_manifest(f, blocks={"image": 32, "description": 0}),
        "index.json",
    ),
    "manifest with blocks as a list": (lambda f: _set_manifest(f, blocks=[32]), "index.json"),
    "data: null": (lambda f: _set_manifest(f, data=None), "index.json"),
    "manifest as a list": (lambda f: (f / "index.json").write_text("[]"), "index.json"),
    "paths.json as a list": (lambda f: (_data(f) / "paths.json").write_text("[]"), "paths.json"),
    "ids.json as an object": (lambda f: (_data(f) / "ids.json").write_text("{}"), "ids.json"),
    "ids.json with a duplicate": (
        lambda f: (_data(f) / "ids.json").write_text(json.dumps(["item-000"] * 8)),
        "ids.json",
    ),
    "metadata.json as a list": (lambda f: (_data(f) / "metadata.json").write_text("[]"), "metadata.json"),
    "garbage faiss.index": (lambda f: (_data(f) / "faiss.index").write_bytes(b"junk"), "faiss.index"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_index_folders_are_one_line_naming_the_file(small_index, tmp_path, tiny_model, case):
    """Issue 12 item 5: these escaped as raw ValueError/EOFError/KeyError/TypeError, or loaded and then every
    search failed."""
    corrupt, file_name = CORRUPTIONS[case]
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    corrupt(folder)
    with pytest.raises(DataError) as error:
        CatalogIndex.load(folder, tiny_model)
    message = str(error.value)
    assert file_name in message and "\n" not in message, message


def test_a_corrupt_index_is_exit_2_on_the_command_line(small_index, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    (_data(folder) / "features.npy").write_bytes(b"")
    result = runner.invoke(
        app, ["search", "--index", str(folder), "--id", "item-001", "--text", "is red", "--backbone", "tiny"]
    )
    assert result.exit_code == 2, result.output
    assert (
        "corrupt feature file" in result.output and "features.npy" in result.output and "Traceback" not in result.output
    )


@pytest.mark.parametrize("entry", ["/etc/passwd", "../../../../../../etc/passwd", "sub/../../outside.jpg"])
def test_image_paths_outside_the_catalog_root_are_refused(small_index, tmp_path, tiny_model, entry):
    """Issue 12 item 7: /images served whatever paths.json named (/etc/passwd)."""
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    paths = json.loads((_data(folder) / "paths.json").read_text())
    assert not any(os.path.isabs(p) for p in paths.values())  # stored relative to the recorded root
    paths["item-003"] = entry
    (_data(folder) / "paths.json").write_text(json.dumps(paths))
    with pytest.raises(DataError, match=r"paths\.json: the path of 'item-003' .* is not inside the catalog root"):
        CatalogIndex.load(folder, tiny_model)


@pytest.mark.parametrize("data", ["../elsewhere", "/tmp", "data-000001/../../x", "."])
def test_the_manifest_data_folder_stays_inside_the_index(small_index, tmp_path, tiny_model, data):
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    _set_manifest(folder, data=data)
    with pytest.raises(DataError, match="field 'data' must name a data-NNNNNN folder"):
        CatalogIndex.load(folder, tiny_model)


def test_an_index_without_a_catalog_root_asks_for_a_rebuild(small_index, tmp_path, tiny_model):
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    _set_manifest(folder, root=KeyError)
    with pytest.raises(DataError, match="field 'root'.*older fashion-cir, rebuild it"):
        CatalogIndex.load(folder, tiny_model)


@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_adding_images_from_another_folder_widens_the_recorded_root(tmp_path, tiny_model, make_jpeg, store):
    """On both stores (the service serves images from inside the root only); a rebuild with
    --overwrite starts again, Milvus in the collection named by the options."""
    from fashion_cir.retrieval.folder import open_index

    spec = "faiss" if store == "faiss" else f"milvus:{tmp_path / 'milvus' / 'shop.db'}"
    options = {"collection": "summer_shop"} if store == "milvus" else None
    first = {f"a{i}": make_jpeg(tmp_path / "shop" / "summer" / f"a{i}.jpg", seed=i) for i in range(3)}
    second = {f"b{i}": make_jpeg(tmp_path / "shop" / "winter" / f"b{i}.jpg", seed=10 + i) for i in range(2)}
    build_index(tmp_path / "index", tiny_model, first, store=spec, milvus=options, progress=False)
    assert _manifest(tmp_path / "index")["root"] == str((tmp_path / "shop" / "summer").resolve())
    index = add_to_index(tmp_path / "index", tiny_model, second, progress=False)
    assert index.config["root"] == str((tmp_path / "shop").resolve())
    assert _manifest(tmp_path / "index")["root"] == str((tmp_path / "shop").resolve())
    loaded = open_index(tmp_path / "index", tiny_model)
    assert {i: loaded.paths[i] for i in loaded.ids} == {i: p.resolve() for i, p in {**first, **second}.items()}
    assert loaded.config["store"].get("collection") == (options or {}).get("collection")
    rebuilt = build_index(
        tmp_path / "index", tiny_model, second, store=spec, milvus=options, overwrite=True, progress=False
    )
    assert sorted(rebuilt.ids) == ["b0", "b1"]
    assert _manifest(tmp_path / "index")["root"] == str((tmp_path / "shop" / "winter").resolve())


def test_concurrent_index_adds_take_turns_and_lose_nothing(tmp_path, drawings):
    """Issue 12 item 12: two concurrent ``index add`` runs loaded the same index and the last save won (or
    picked the same data-N). Both adds are made to encode at the same moment unless one waits."""
    items = list(drawings[0].items())
    base, batch_a, batch_b = dict(items[:10]), dict(items[10:20]), dict(items[20:30])
    model = load_model(backbone="tiny")
    build_index(tmp_path / "index", model, base, progress=False)
    together = threading.Barrier(2, timeout=3)
    encode = model.backbone.encode_image_trunk

    def meeting(pixels):
        with contextlib.suppress(threading.BrokenBarrierError):  # the other add waits for the lock: it never comes
            together.wait()
        return encode(pixels)

    model.backbone.encode_image_trunk = meeting
    errors: list[BaseException] = []

    def add(batch):
        try:
            add_to_index(tmp_path / "index", model, batch, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(batch,)) for batch in (batch_a, batch_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    loaded = CatalogIndex.load(tmp_path / "index", model)
    assert sorted(loaded.ids) == sorted(items_id for items_id, _ in items) and len(set(loaded.ids)) == 30
    assert [p.name for p in (tmp_path / "index").glob("data-*")] == [loaded.config["data"]]


# -- building and updating by hand, on a few drawings (issue 24) --
def _copy_drawings(drawings, folder: Path, ids: list[str]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {i: Path(shutil.copy(drawings[0][i], folder / f"{i}.jpg")) for i in ids}


def test_build_records_the_manifest_and_the_report(tmp_path, tiny_model, drawings):
    paths = _copy_drawings(drawings, tmp_path / "shop", ["item-000", "item-001", "item-002"])
    paths["broken"] = tmp_path / "shop" / "broken.jpg"
    paths["broken"].write_bytes(b"not a jpeg")
    metadata = {i: dict(drawings[1][i]) for i in paths if i != "broken"}
    metadata["item-001"]["in stock"] = True  # not an identifier: not filterable
    index = build_index(tmp_path / "index", tiny_model, paths, metadata, progress=False, max_failed_share=0.5)
    config = json.loads((tmp_path / "index" / "index.json").read_text())
    assert config["fields"] == ["category", "color", "description"] and config["factory"] == "Flat"
    assert config["store"] == {"kind": "faiss", "uri": None} and config["metric"] == "inner_product"
    assert config["feature_dim"] == tiny_model.backbone.feature_dim and config["count"] == 3
    assert config["matcher"] is None and config["attributes"] is None and config["model_dir"] is None
    assert config["blocks"] == tiny_model.block_dims() and config["nprobe"] == 64 and config["ef_search"] == 64
    assert config["mmap"] is False and config["candidates"] is None  # one-stage search, read into memory
    assert config["backbone"] == tiny_model.backbone.spec and config["root"] == str((tmp_path / "shop").resolve())
    assert config["image_fingerprint"] == tiny_model.backbone.image_fingerprint()
    assert config["preprocess"] == tiny_model.backbone.preprocess_description
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", config["created"]) and "python" in config["versions"]
    report = index.report
    assert report["requested"] == 4 and report["computed"] == 3 and report["reused"] == 0 and report["added"] == 3
    assert report["failed"] == 1 and list(report["failures"]) == ["broken"] and report["index_seconds"] >= 0
    assert (tmp_path / "index" / "feature-cache").is_dir()  # the default cache, inside the index folder
    assert index.ids == ["item-000", "item-001", "item-002"]
    with pytest.raises(DataError) as error:
        build_index(tmp_path / "index", tiny_model, paths, metadata, progress=False)
    assert str(error.value) == (
        f"an index already exists in {tmp_path / 'index'}; add images with `fashion-cir index add`, "
        "or rebuild with --overwrite"
    )
    again = build_index(
        tmp_path / "index",
        tiny_model,
        paths,
        metadata,
        progress=False,
        overwrite=True,
        max_failed_share=0.5,
        factory="HNSW8",
        nprobe=3,
        ef_search=9,
        cache_dir=tmp_path / "cache",
    )
    assert again.report["reused"] == 0 and again.report["computed"] == 3 and (tmp_path / "cache").is_dir()
    assert (again.config["factory"], again.config["nprobe"], again.config["ef_search"]) == ("HNSW8", 3, 9)
    with pytest.raises(DataError, match=r"^1 of 4 catalog images failed \(more than the allowed 20%\)"):
        build_index(tmp_path / "other", tiny_model, paths, metadata, progress=False)
    assert not (tmp_path / "other" / "index.json").exists()


def test_add_upsert_and_remove_by_hand(tmp_path, tiny_model, drawings):
    shop = _copy_drawings(drawings, tmp_path / "shop", ["item-000", "item-001", "item-002", "item-003"])
    metadata = {i: dict(drawings[1][i]) for i in shop}
    folder = tmp_path / "index"
    build_index(folder, tiny_model, {i: shop[i] for i in ["item-000", "item-001"]}, metadata, progress=False)
    same = add_to_index(folder, tiny_model, {"item-000": shop["item-000"]}, metadata, replace=True, progress=False)
    assert same.report["reused"] == 1 and same.report["computed"] == 0  # the build's cache, in the index folder
    empty = add_to_index(folder, tiny_model, {}, replace=True, progress=False)
    assert empty.report == {
        "requested": 0,
        "computed": 0,
        "reused": 0,
        "failed": 0,
        "failures": {},
        "replaced": 0,
        "added": 0,
    }
    added = add_to_index(folder, tiny_model, shop, metadata, progress=False)
    assert added.report == {
        **{k: added.report[k] for k in ("failures", "encode_seconds")},
        "requested": 4,
        "computed": 2,  # only the two new images are encoded
        "reused": 0,
        "failed": 0,
        "already_indexed": 2,
        "added": 2,
    }
    nothing = add_to_index(folder, tiny_model, {"item-000": shop["item-000"]}, metadata, progress=False)
    assert nothing.report == {
        "requested": 1,
        "computed": 0,
        "reused": 0,
        "failed": 0,
        "failures": {},
        "already_indexed": 1,
        "added": 0,
    }
    # upsert: item-001 gets another photo (a new file elsewhere) and new metadata; item-009 is new
    moved = _copy_drawings(drawings, tmp_path / "shop" / "new", ["item-005", "item-009"])
    replaced = add_to_index(
        folder,
        tiny_model,
        {"item-001": moved["item-005"], "item-009": moved["item-009"]},
        {"item-001": {"color": "gold"}, "item-009": dict(drawings[1]["item-009"])},
        replace=True,
        progress=False,
    )
    assert replaced.report["replaced"] == 1 and replaced.report["added"] == 1 and replaced.report["requested"] == 2
    loaded = CatalogIndex.load(folder, tiny_model)
    assert loaded.paths["item-001"] == moved["item-005"].resolve() and loaded.metadata["item-001"] == {"color": "gold"}
    fresh = build_index(tmp_path / "fresh", tiny_model, {"x": moved["item-005"]}, progress=False)
    np.testing.assert_allclose(loaded.vector("item-001"), fresh.vector("x"), atol=1e-6)
    assert loaded.ids == ["item-000", "item-001", "item-002", "item-003", "item-009"]
    index, removed, missing = remove_from_index(folder, ["item-002", "nope", "item-002", "item-000"])
    assert removed == ["item-002", "item-000"] and missing == ["nope"] and len(index) == 3
    data = CatalogIndex.load(folder).config["data"]
    _, removed, missing = remove_from_index(folder, ["nope"])
    assert removed == [] and missing == ["nope"] and CatalogIndex.load(folder).config["data"] == data  # not rewritten
    with pytest.raises(DataError, match="^no ids to remove$"):
        remove_from_index(folder, [])
    with pytest.raises(DataError, match="not a fashion-cir index folder"):
        remove_from_index(tmp_path / "none", ["x"])
    with pytest.raises(DataError, match="not a fashion-cir index folder"):
        add_to_index(tmp_path / "none", tiny_model, shop, progress=False)
    broken = tmp_path / "shop" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"^1 of 1 new catalog images failed"):
        add_to_index(folder, tiny_model, {"broken": broken}, progress=False)
    with pytest.raises(DataError, match=r"^1 of 1 catalog images failed"):
        add_to_index(folder, tiny_model, {"broken": broken}, replace=True, progress=False)


def test_rows_of_a_model_that_reads_descriptions_and_attributes(tmp_path, drawings):
    """An index stores [image | description | attributes] rows for a model that reads all three:
    the blocks rebuilt here from the model's own parts; the description bank under the cache."""
    from fashion_cir.models.matcher import DescriptionBank
    from support.matcher import multi_block_model

    model = multi_block_model(tmp_path / "encoder")
    ids = ["item-000", "item-001", "item-002"]
    shop = _copy_drawings(drawings, tmp_path / "shop", ids)
    metadata = {i: dict(drawings[1][i]) for i in ids}
    index = build_index(tmp_path / "index", model, shop, metadata, progress=False)
    config = index.config
    assert config["matcher"] == model.matcher.config() and config["attributes"] == ["category", "color"]
    assert config["blocks"] == model.block_dims()
    dim = config["feature_dim"]
    described = DescriptionBank(None).features(model.matcher, [metadata[i]["description"] for i in ids])
    attributes = model.attribute_space.one_hot([metadata[i] for i in ids])
    stored = np.stack([index.vector(i) for i in ids])
    np.testing.assert_allclose(stored[:, dim : dim + described.shape[1]], described.numpy(), atol=2e-3)
    np.testing.assert_array_equal(stored[:, dim + described.shape[1] :], attributes.numpy())
    assert list((tmp_path / "index" / "feature-cache").glob("descriptions-*.npz"))
    more = _copy_drawings(drawings, tmp_path / "shop", ["item-003"])
    added = add_to_index(tmp_path / "index", model, more, {"item-003": dict(drawings[1]["item-003"])}, progress=False)
    with np.load(next((tmp_path / "index" / "feature-cache").glob("descriptions-*.npz"))) as bank:
        assert len(bank["keys"]) == 4  # the added item's description joined the build's in the index's cache
    row = added.vector("item-003")
    expected = model.attribute_space.one_hot([drawings[1]["item-003"]]).numpy()[0]
    np.testing.assert_array_equal(row[dim + described.shape[1] :], expected)
    assert row[dim : dim + described.shape[1]].any()


def test_build_and_add_options(tmp_path, tiny_model, drawings):
    from fashion_cir.retrieval.store import StoreSpec

    shop = _copy_drawings(drawings, tmp_path / "shop", ["item-000", "item-001", "item-002", "item-003"])
    folder = tmp_path / "index"
    index = build_index(
        folder, tiny_model, shop, ids=["item-002", "item-000"], store=StoreSpec("faiss"), progress=False
    )
    assert index.ids == ["item-002", "item-000"]
    assert set(index.config) == {
        "format",
        "store",
        "fields",
        "factory",
        "metric",
        "feature_dim",
        "matcher",
        "attributes",
        "blocks",
        "nprobe",
        "ef_search",
        "candidates",
        "mmap",
        "backbone",
        "model_dir",
        "preprocess",
        "image_fingerprint",
        "count",
        "data",
        "root",
        "created",
        "versions",
        "updated",
    }
    for name in ("encode_seconds", "index_seconds"):
        value = index.report[name]
        assert isinstance(value, float) and 0 <= value < 600 and round(value, 3) == value
    broken = tmp_path / "shop" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    report = build_index(tmp_path / "b", tiny_model, {**shop, "broken": broken}, progress=False).report
    assert report["failures"]["broken"] != "not encoded" and "broken" in report["failures"]
    added = add_to_index(folder, tiny_model, shop, ids=["item-001"], progress=False)
    assert added.ids == ["item-002", "item-000", "item-001"] and set(added.config) == set(index.config)
    with pytest.raises(DataError) as error:
        build_index(tmp_path / "c0", tiny_model, shop, candidates=0, progress=False)
    assert str(error.value) == "candidates must be a positive number of items (or None: one-stage search), got 0"
    assert build_index(tmp_path / "c1", tiny_model, shop, candidates=1, progress=False).config["candidates"] == 1
    with pytest.raises(ModelError, match="fingerprint"):
        add_to_index(folder, load_model(backbone="tiny:1"), shop, progress=False)
    remove_from_index(folder, ["item-001"])
    again = add_to_index(folder, tiny_model, shop, ids=["item-001"], progress=False)  # in the folder's cache
    assert again.report["reused"] == 1 and again.report["computed"] == 0 and again.report["added"] == 1
    upserted = add_to_index(
        folder,
        tiny_model,
        {i: shop[i] for i in ["item-000", "item-002", "item-003"]},
        cache_dir=tmp_path / "c",
        replace=True,
        progress=False,
    )
    assert upserted.report["replaced"] == 2 and upserted.report["added"] == 1 and (tmp_path / "c").is_dir()
    # a model folder is recorded, to search the index with it later
    saved = load_model(backbone="tiny")
    saved.save(tmp_path / "model")
    from_folder = load_model(tmp_path / "model")
    built = build_index(tmp_path / "m", from_folder, {"item-000": shop["item-000"]}, progress=False)
    assert built.config["model_dir"] == str(from_folder.source) and from_folder.source


def test_builds_and_adds_show_progress_unless_told_not_to(tmp_path, tiny_model, drawings, capsys):
    shop = _copy_drawings(drawings, tmp_path / "shop", ["item-000", "item-001", "item-002"])
    build_index(tmp_path / "index", tiny_model, {i: shop[i] for i in ["item-000", "item-001"]})
    assert "encoding images: 2/2 img" in capsys.readouterr().err
    add_to_index(tmp_path / "index", tiny_model, shop)
    assert "encoding images: 1/1 img" in capsys.readouterr().err
    build_index(tmp_path / "quiet", tiny_model, {i: shop[i] for i in ["item-000", "item-001"]}, progress=False)
    add_to_index(tmp_path / "quiet", tiny_model, shop, progress=False)
    assert "encoding images" not in capsys.readouterr().err
