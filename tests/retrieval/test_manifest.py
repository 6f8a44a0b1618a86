"""index.json (retrieval/manifest.py): every field's check as its exact one-line error, unknown
fields passed through, and the catalog root."""

from __future__ import annotations

import json
import os

import pytest

from fashion_cir.errors import DataError
from fashion_cir.retrieval.manifest import FORMAT, IndexManifest, catalog_root, check_manifest, read_manifest

GOOD = {
    "format": FORMAT,
    "feature_dim": 32,
    "backbone": "tiny",
    "image_fingerprint": "abc123",
    "root": "/data/catalog",
    "count": 3,
    "nprobe": 16,
    "ef_search": 64,
    "factory": "Flat",
    "data": "data-000001",
}
REBUILD = "; rebuild the index"
POSITIVE = "count, feature_dim, nprobe and ef_search must be positive; rebuild the index"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "fashion-cir-index/2"}, "unsupported format 'fashion-cir-index/2' (expected fashion-cir-index/1)"),
        ({"format": None}, "unsupported format None (expected fashion-cir-index/1)"),
        ({"store": ["faiss"]}, "field 'store' must be an object naming its kind" + REBUILD),
        ({"store": {"kind": 3}}, "field 'store' must be an object naming its kind" + REBUILD),
        ({"feature_dim": 0}, POSITIVE),
        ({"count": -1}, POSITIVE),
        ({"nprobe": 0}, POSITIVE),
        ({"ef_search": 0}, POSITIVE),
        ({"feature_dim": True}, "field 'feature_dim' must be int, got True" + REBUILD),
        ({"count": "3"}, "field 'count' must be int, got '3'" + REBUILD),
        ({"nprobe": 1.5}, "field 'nprobe' must be int, got 1.5" + REBUILD),
        ({"ef_search": None}, "field 'ef_search' must be int, got None" + REBUILD),
        ({"backbone": 3}, "field 'backbone' must be str, got 3" + REBUILD),
        ({"image_fingerprint": None}, "field 'image_fingerprint' must be str, got None" + REBUILD),
        ({"factory": ["Flat"]}, "field 'factory' must be str, got ['Flat']" + REBUILD),
        (
            {"root": 7},
            "field 'root' must be str, got 7; it was written by an older fashion-cir, rebuild it with --overwrite",
        ),
        (
            {"root": None},
            "field 'root' must be str, got None; it was written by an older fashion-cir, rebuild it with --overwrite",
        ),
        (
            {"root": "catalog"},
            "field 'root' must be the absolute folder of the catalog images, not 'catalog'" + REBUILD,
        ),
        ({"root": "/"}, "field 'root' must be the absolute folder of the catalog images, not '/'" + REBUILD),
        ({"root": "//."}, "field 'root' must be the absolute folder of the catalog images, not '//.'" + REBUILD),
        ({"fields": ["color", "a) or (b"]}, "field 'fields' must list metadata field names (identifiers)" + REBUILD),
        ({"fields": "color"}, "field 'fields' must list metadata field names (identifiers)" + REBUILD),
        ({"data": None}, "field 'data' must be str, got None" + REBUILD),
        ({"data": 1}, "field 'data' must be str, got 1" + REBUILD),
        ({"data": "data-12345"}, "field 'data' must name a data-NNNNNN folder inside the index, got 'data-12345'"),
        (
            {"data": "data-000001/.."},
            "field 'data' must name a data-NNNNNN folder inside the index, got 'data-000001/..'",
        ),
        (
            {"data": "../data-000001"},
            "field 'data' must name a data-NNNNNN folder inside the index, got '../data-000001'",
        ),
        (
            {"blocks": {"image": 31}},
            "field 'blocks' must map block names to widths, the image block's being feature_dim" + REBUILD,
        ),
        (
            {"blocks": {"image": 32, "matcher": 0}},
            "field 'blocks' must map block names to widths, the image block's being feature_dim" + REBUILD,
        ),
        (
            {"blocks": {"matcher": 384}},
            "field 'blocks' must map block names to widths, the image block's being feature_dim" + REBUILD,
        ),
        (
            {"blocks": {"image": "32"}},
            "field 'blocks' must map block names to widths, the image block's being feature_dim" + REBUILD,
        ),
        (
            {"blocks": [32]},
            "field 'blocks' must map block names to widths, the image block's being feature_dim" + REBUILD,
        ),
        ({"candidates": 0}, "field 'candidates' must be a positive int or null" + REBUILD),
        ({"candidates": "100"}, "field 'candidates' must be a positive int or null, got '100'" + REBUILD),
        ({"mmap": "yes"}, "field 'mmap' must be true or false, got 'yes'" + REBUILD),
    ],
)
def test_each_bad_field_is_one_line_naming_the_file(change, message):
    with pytest.raises(DataError) as error:
        check_manifest({**GOOD, **change}, "/idx/index.json")
    assert str(error.value) == "/idx/index.json: " + message


def test_every_field_has_its_message():
    """A field that can fail names its type (``_TYPED``) or has a message (``_MESSAGES``)."""
    from fashion_cir.retrieval.manifest import _MESSAGES, _TYPED

    assert set(IndexManifest.model_fields) == {"format", "data", *_TYPED, *_MESSAGES}
    assert not set(_TYPED) & set(_MESSAGES)


@pytest.mark.parametrize(
    "field", ["format", "feature_dim", "backbone", "image_fingerprint", "count", "nprobe", "factory"]
)
def test_a_missing_field_is_named(field):
    config = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(DataError, match=f"^x.json: (field '{field}' must be|unsupported format None)"):
        check_manifest(config, "x.json")


def test_good_manifests_pass_with_their_other_fields():
    checked = check_manifest({**GOOD, "matcher": {"spec": "m", "dim": 8}, "versions": [1]}, "x")
    assert isinstance(checked, IndexManifest) and checked.store_kind == "faiss" and checked.fields == []
    assert checked.blocks is None and checked.model_extra == {"matcher": {"spec": "m", "dim": 8}, "versions": [1]}
    assert check_manifest({**GOOD, "count": 0, "nprobe": 1, "ef_search": 1, "feature_dim": 1, "blocks": None}, "x")
    blocks = check_manifest({**GOOD, "blocks": {"image": 32, "matcher": 384}, "fields": ["color", "in_stock"]}, "x")
    assert blocks.blocks == {"image": 32, "matcher": 384} and blocks.fields == ["color", "in_stock"]
    # a Milvus index has no data folder; its store names its kind
    milvus = {k: v for k, v in GOOD.items() if k != "data"}
    assert check_manifest({**milvus, "store": {"kind": "milvus", "uri": "/m.db"}}, "x").store_kind == "milvus"
    assert check_manifest({**milvus, "store": {"kind": "milvus"}, "data": 5}, "x").data == 5
    assert check_manifest({**GOOD, "store": {}}, "x").store_kind == "faiss"
    with pytest.raises(DataError, match=r"^x: field 'data' must be str, got None"):
        check_manifest({**milvus, "store": {}}, "x")
    for not_an_object in ([GOOD], "index", None):
        with pytest.raises(DataError) as error:
            check_manifest(not_an_object, "/i/index.json")
        assert str(error.value) == f"/i/index.json: expected a JSON object, got {type(not_an_object).__name__}"


def test_read_manifest_returns_the_file_as_read(tmp_path):
    with pytest.raises(DataError) as error:
        read_manifest(tmp_path)
    assert str(error.value) == (
        f"not a fashion-cir index folder (no index.json): {tmp_path}; build one with `fashion-cir index build`"
    )
    (tmp_path / "index.json").mkdir()
    with pytest.raises(DataError, match="^not a fashion-cir index folder"):
        read_manifest(str(tmp_path))
    (tmp_path / "index.json").rmdir()
    (tmp_path / "index.json").write_text(json.dumps({**GOOD, "extra": {"kept": True}}))
    assert read_manifest(str(tmp_path)) == {**GOOD, "extra": {"kept": True}}
    (tmp_path / "index.json").write_text(json.dumps({**GOOD, "count": -2}))
    with pytest.raises(DataError) as error:
        read_manifest(tmp_path)
    assert str(error.value) == f"{tmp_path / 'index.json'}: {POSITIVE}"
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(DataError, match=r"^malformed index manifest .*index\.json: "):
        read_manifest(tmp_path)


def test_catalog_root_is_the_deepest_common_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink(tmp_path / "a" / "b", tmp_path / "link")
    assert catalog_root([tmp_path / "a" / "b" / "x.jpg", tmp_path / "a" / "y.jpg"]) == str(tmp_path / "a")
    assert catalog_root([tmp_path / "link" / "x.jpg"]) == str(tmp_path / "a" / "b")  # resolved
    assert catalog_root([tmp_path / "a" / "b" / "x.jpg"], root=str(tmp_path / "a")) == str(tmp_path / "a")
    assert catalog_root([], root="/srv/images") == "/srv/images"
    assert catalog_root(["/a/b/x.jpg", "/a/b/y.jpg"]) == "/a/b"
    for paths, root, shown in (
        (["/a/x.jpg", "/b/y.jpg", "/c/z.jpg"], None, "/a and /b"),
        (["/x.jpg"], None, "/"),
        (["/a/x.jpg"], "/b", "/a and /b"),
        ([], None, ""),
    ):
        with pytest.raises(DataError) as error:
            catalog_root(paths, root)
        assert str(error.value) == (
            f"the catalog images share no folder below the filesystem root ({shown}); "
            "keep a catalog's images under one folder"
        )
