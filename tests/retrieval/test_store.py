"""The store interface (retrieval/store.py): the ``--store`` spec, row widths, the vectors an index
searches, the manifest swap and the model check, on a minimal in-memory store."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fashion_cir.errors import DataError, ModelError
from fashion_cir.retrieval.store import CatalogStore, StoreSpec, item_vectors, parse_store_spec, row_width


def test_store_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_store_spec(" faiss ") == StoreSpec("faiss") and StoreSpec("faiss").uri is None
    assert parse_store_spec("milvus:runs/x.db") == StoreSpec("milvus", str(tmp_path / "runs" / "x.db"))
    for uri in ("http://h:19530", "https://h", "tcp://h:1", "unix:/tmp/m.sock"):
        spec = parse_store_spec(f"milvus:{uri}")
        assert spec == StoreSpec("milvus", uri) and not spec.embedded
    assert parse_store_spec("milvus:/m/a.db").embedded and parse_store_spec("milvus:/m/a.db").uri == "/m/a.db"
    assert not StoreSpec("faiss").embedded and not StoreSpec("milvus").embedded
    assert not StoreSpec("faiss", "/x.db").embedded
    assert StoreSpec("milvus", "/m/a.db").to_config() == {"kind": "milvus", "uri": "/m/a.db"}
    assert StoreSpec("faiss").to_config() == {"kind": "faiss", "uri": None}
    with pytest.raises(DataError) as error:
        parse_store_spec("milvus:runs/x.sqlite")
    assert str(error.value) == (
        "bad store 'milvus:runs/x.sqlite': a milvus-lite file must end in .db (milvus:runs/x/milvus.db), "
        "a server is a URI (milvus:http://host:19530)"
    )
    for bad in ("milvus", "milvus:", "faiss:x.db", "qdrant:x.db", "FAISS"):
        with pytest.raises(DataError) as error:
            parse_store_spec(bad)
        assert str(error.value) == (
            f"unknown store {bad.strip()!r}: use faiss, milvus:PATH.db (embedded milvus-lite) or "
            "milvus:http://host:19530 (a Milvus server or cluster)"
        )


def test_row_width_and_item_vectors():
    assert row_width({"feature_dim": 32}) == 32
    assert row_width({"feature_dim": "32", "matcher": {"dim": 16}}) == 48
    assert row_width({"feature_dim": 32, "matcher": None}) == 32
    assert row_width({"feature_dim": 32, "blocks": {"image": 32, "matcher": 16, "attributes": 5}}) == 53
    assert row_width({"feature_dim": 32, "blocks": {}, "matcher": {"dim": 8}}) == 40
    rows = np.array([[3.0, 4.0, 7.0, -1.0], [0.0, 0.0, 2.0, 2.0]], dtype=np.float64)
    vectors = item_vectors(rows, {"feature_dim": 2})
    assert vectors.dtype == np.float32 and vectors.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(vectors, [[0.6, 0.8, 7.0, -1.0], [0.0, 0.0, 2.0, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(
        item_vectors(rows, {"feature_dim": 3}), [[3 / 74**0.5, 4 / 74**0.5, 7 / 74**0.5, -1.0], [0, 0, 1, 2]], rtol=1e-6
    )
    tiny = item_vectors(np.array([[1e-13, 0.0, 5.0]]), {"feature_dim": 2})
    np.testing.assert_allclose(tiny, [[0.1, 0.0, 5.0]], rtol=1e-5)  # divided by the 1e-12 floor
    assert rows[0, 0] == 3.0  # the input is left alone


class MemoryStore(CatalogStore):
    """The least a store implements, to exercise the shared methods."""

    def __init__(self, folder: Path, config: dict):
        self.folder, self.config = folder, config

    def __len__(self):
        return 0

    def __contains__(self, image_id):
        return False

    def vector(self, image_id):
        raise KeyError(image_id)

    def stored_rows(self, ids):
        raise KeyError(ids[0])

    def search_vectors(self, queries, k, exclude=(), filter=None):
        return []

    def add_features(self, ids, features, metadata, paths):
        pass

    def upsert_features(self, ids, features, metadata, paths):
        pass

    def remove(self, ids):
        return []

    def save(self):
        self.write_manifest()


def test_shared_store_methods(tmp_path, tiny_model):
    store = MemoryStore(tmp_path, {"image_fingerprint": "f1", "fields": ["color", "kids"]})
    assert store.store_kind == "faiss" and store.fields == ["color", "kids"] and store.fingerprint == "f1"
    assert store.fields is not store.config["fields"]
    assert MemoryStore(tmp_path, {"store": {"kind": "milvus"}}).store_kind == "milvus"
    assert MemoryStore(tmp_path, {"store": {}}).store_kind == "faiss" and MemoryStore(tmp_path, {}).fields == []
    # the manifest swap clears the temporaries of killed writers, and only those
    (tmp_path / ".index.json.123.tmp").write_text("{")
    (tmp_path / ".index.json.9.tmp").write_text("{")
    (tmp_path / "index.json.tmp").write_text("keep")
    store.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "index.json.tmp"]
    assert json.loads((tmp_path / "index.json").read_text()) == store.config
    store.discard()  # a no-op by default


def test_check_model_names_both_encoders_and_the_blocks(tmp_path, tiny_model):
    fingerprint = tiny_model.backbone.image_fingerprint()
    config = {"image_fingerprint": fingerprint, "backbone": "tiny"}
    MemoryStore(tmp_path, config).check_model(tiny_model)
    MemoryStore(tmp_path, {**config, "matcher": None, "attributes": None}).check_model(tiny_model)
    with pytest.raises(ModelError) as error:
        MemoryStore(tmp_path, {**config, "image_fingerprint": "0ld", "backbone": "tiny:7"}).check_model(tiny_model)
    assert str(error.value) == (
        f"index {tmp_path} was built with image encoder tiny:7 (fingerprint 0ld) but the model given has "
        f"{tiny_model.backbone.spec} (fingerprint {fingerprint}); use the model the index was built with, "
        "or rebuild the index with this model"
    )
    reader = SimpleNamespace(
        backbone=tiny_model.backbone,
        matcher=SimpleNamespace(config=lambda: {"spec": "hf:enc", "dim": 16}),
        attribute_space=SimpleNamespace(names=["category", "color"]),
    )
    built = {**config, "matcher": {"spec": "hf:enc", "dim": 16}, "attributes": ["category", "color"]}
    MemoryStore(tmp_path, built).check_model(reader)
    for change, held in (
        ({"matcher": None}, {"matcher": None, "attributes": ["category", "color"]}),
        ({"matcher": {"spec": "hf:other"}}, {"matcher": "hf:other", "attributes": ["category", "color"]}),
        ({"attributes": ["category"]}, {"matcher": "hf:enc", "attributes": ["category"]}),
    ):
        with pytest.raises(ModelError) as error:
            MemoryStore(tmp_path, {**built, **change}).check_model(reader)
        assert str(error.value) == (
            f"index {tmp_path} holds items for {held} but the model reads "
            "{'matcher': 'hf:enc', 'attributes': ['category', 'color']}; use the model the index was built "
            "with, or rebuild the index"
        )
    with pytest.raises(ModelError, match=r"holds items for \{'matcher': 'hf:enc', 'attributes'"):
        MemoryStore(tmp_path, built).check_model(tiny_model)
