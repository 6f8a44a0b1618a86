"""An index folder whatever its store (retrieval/folder.py): opening it by its manifest, the model
an index is searched with, and a LiveIndex that follows the folder and keeps the last good version."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from fashion_cir.errors import DataError, ModelError
from fashion_cir.models.cir import CIRModel, load_model
from fashion_cir.retrieval import CatalogIndex, add_to_index, build_index
from fashion_cir.retrieval.faiss_store import DATA_FILES
from fashion_cir.retrieval.folder import LiveIndex, index_info, index_model, open_index
from support.serving import synthetic_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return synthetic_catalog(tmp_path_factory.mktemp("folder") / "images", 6)


@pytest.fixture()
def folder(tmp_path, tiny_model, catalog):
    paths, metadata = catalog
    first = {i: paths[i] for i in list(paths)[:4]}
    build_index(tmp_path / "index", tiny_model, first, metadata, progress=False)
    return tmp_path / "index"


def _rewrite_manifest(folder, **changes):
    manifest = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**manifest, **changes}))


def test_open_index_by_the_store_its_manifest_names(folder, tiny_model):
    index = open_index(folder, tiny_model)
    assert isinstance(index, CatalogIndex) and len(index) == 4
    with pytest.raises(ModelError, match="fingerprint"):
        open_index(folder, load_model(backbone="tiny:1"))
    assert len(open_index(str(folder))) == 4  # no model: no check
    _rewrite_manifest(folder, store={"kind": "qdrant"})
    with pytest.raises(DataError) as error:
        open_index(folder)
    assert str(error.value) == f"{folder / 'index.json'}: unknown store kind 'qdrant'"
    # a Milvus manifest goes to the Milvus store (which checks its fields before opening anything)
    store = {"kind": "milvus", "uri": str(folder / "gone.db"), "collection": "c", "index_type": "FLAT"}
    _rewrite_manifest(folder, store=store)
    with pytest.raises(DataError, match=r"names the milvus-lite file .*gone\.db, which does not exist"):
        open_index(folder, tiny_model)


def test_index_model_as_given_from_its_folder_or_its_backbone(folder, tmp_path, tiny_model):
    tiny_model.train()
    try:
        assert index_model(folder, tiny_model) is tiny_model and not tiny_model.training
    finally:
        tiny_model.eval()
    built_with = index_model(folder)  # the index records no model folder: its backbone
    assert built_with.backbone.spec == tiny_model.backbone.spec and built_with.source is None
    trained = load_model(backbone="tiny", query_mode="text")
    with torch.no_grad():
        trained.backbone.clip.text_projection.mul_(-1)
    trained.mark_trained(["backbone.clip.text_projection"])
    trained.save(tmp_path / "model")
    _rewrite_manifest(folder, model_dir=str(tmp_path / "model"))
    from_folder = index_model(folder)
    assert from_folder.source == (tmp_path / "model").resolve() and from_folder.query_mode == "text"
    assert index_model(folder, tmp_path / "model").query_mode == "text"
    assert index_model(folder, str(tmp_path / "model")).source == (tmp_path / "model").resolve()
    assert index_model(folder, "tiny:1").backbone.spec == "tiny:1"
    shutil.rmtree(tmp_path / "model")  # the model folder is gone: the backbone it was built on
    fallback = index_model(folder)
    assert isinstance(fallback, CIRModel) and fallback.source is None and fallback.query_mode != "text"


def test_live_index_follows_the_folder_and_keeps_the_last_good_version(folder, tiny_model, catalog, caplog):
    paths, metadata = catalog
    live = LiveIndex(folder, tiny_model)
    first = live.current()
    assert live.current() is first and len(live) == 4 and "item-000" in live and "item-005" not in live
    assert live.problem is None and live.ids == first.ids and live.folder == folder
    add_to_index(folder, tiny_model, {"item-004": paths["item-004"]}, metadata, progress=False)
    assert len(live) == 5 and "item-004" in live and live.current() is not first
    good = live.current()
    manifest = (folder / "index.json").read_text()
    (folder / "index.json").write_text(manifest.replace('"count": 5', '"count": -5'))
    with caplog.at_level(logging.ERROR, logger="fashion_cir.retrieval.folder"):
        assert live.current() is good and len(live) == 5
        assert live.current() is good  # the same broken version is not retried or logged again
    assert live.problem == (
        "the index changed but cannot be opened, the previous version is served: "
        f"{folder / 'index.json'}: count, feature_dim, nprobe and ef_search must be positive; rebuild the index"
    )
    assert [r.getMessage() for r in caplog.records] == [live.problem] and caplog.records[0].exc_info is None
    (folder / "index.json").unlink()
    assert live.current() is good
    assert live.problem.endswith(f"{folder / 'index.json'} is missing")
    (folder / "index.json").write_text(manifest)
    assert live.current() is not good and len(live) == 5 and live.problem is None


def test_live_index_logs_an_unexpected_error_with_its_traceback(folder, tiny_model, caplog, monkeypatch):
    live = LiveIndex(folder, tiny_model)
    monkeypatch.setattr(CatalogIndex, "load", classmethod(lambda cls, *a: 1 / 0))
    _rewrite_manifest(folder, nprobe=8)
    with caplog.at_level(logging.ERROR, logger="fashion_cir.retrieval.folder"):
        assert len(live) == 4
    assert live.problem.endswith("served: division by zero")
    assert caplog.records[0].exc_info[0] is ZeroDivisionError


def test_a_manifest_without_a_store_is_faiss(folder):
    manifest = json.loads((folder / "index.json").read_text())
    del manifest["store"]
    (folder / "index.json").write_text(json.dumps(manifest))
    assert isinstance(open_index(folder), CatalogIndex)
    (folder / "index.json").write_text(json.dumps({**manifest, "store": {}}))
    assert isinstance(open_index(folder), CatalogIndex)


def test_index_info_of_a_manifest_without_store_or_blocks_and_of_missing_files(folder):
    """What ``index_info`` reports, worked out from the files: a manifest written before stores and
    blocks were recorded is a FAISS one with one image block; a file that is not there counts 0
    bytes; only a mapped index keeps its vectors and rows out of memory; a Milvus folder lists none."""
    manifest = json.loads((folder / "index.json").read_text())
    for key in ("store", "blocks"):
        manifest.pop(key, None)
    (folder / "index.json").write_text(json.dumps(manifest))
    data = folder / manifest["data"]
    sizes = {f.name: f.stat().st_size for f in data.iterdir() if f.name in DATA_FILES}
    info = index_info(folder)
    assert info["store"] == {"kind": "faiss"} and info["blocks"] == {"image": manifest["feature_dim"]}
    assert info["files"] == {f"{manifest['data']}/{name}": size for name, size in sizes.items()}
    assert (info["vectors_bytes"], info["rows_bytes"]) == (sizes["faiss.index"], sizes["features.npy"])
    assert info["read_into_memory_bytes"] == sum(sizes.values()) and info["mmap"] is False
    _rewrite_manifest(folder, mmap=True)
    mapped = index_info(folder)
    assert mapped["read_into_memory_bytes"] == sum(sizes.values()) - sizes["faiss.index"] - sizes["features.npy"]
    (data / "features.npy").unlink()
    (data / "faiss.index").unlink()
    bare = index_info(folder)
    assert (bare["vectors_bytes"], bare["rows_bytes"]) == (0, 0)
    assert bare["read_into_memory_bytes"] == sum(
        v for k, v in sizes.items() if k not in ("faiss.index", "features.npy")
    )
    _rewrite_manifest(folder, store={})  # a store without a kind is FAISS, as for open_index
    assert index_info(folder)["vectors_bytes"] == 0 and "files" in index_info(folder)
    _rewrite_manifest(folder, store={"kind": "milvus", "uri": "x.db", "collection": "c"})
    assert "files" not in index_info(folder) and index_info(folder)["store"]["kind"] == "milvus"


def test_live_index_opens_once_and_checks_its_model_on_every_open(folder, tiny_model, monkeypatch):
    with pytest.raises(ModelError, match="fingerprint"):
        LiveIndex(folder, load_model(backbone="tiny:1"))
    opened = []
    load = CatalogIndex.load.__func__

    def counted(cls, *args):
        opened.append(args)
        return load(cls, *args)

    monkeypatch.setattr(CatalogIndex, "load", classmethod(counted))
    live = LiveIndex(folder, tiny_model)
    assert live.model is tiny_model
    for _ in range(3):
        live.current()
    assert len(opened) == 1 and opened[0][1] is tiny_model
    manifest = json.loads((folder / "index.json").read_text())
    _rewrite_manifest(folder, image_fingerprint="another")
    assert len(live) == 4 and len(opened) == 2 and opened[1][1] is tiny_model
    assert "fingerprint another" in live.problem
    (folder / "index.json").write_text(json.dumps(manifest))
    assert len(live) == 4 and live.problem is None
