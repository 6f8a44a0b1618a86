"""The Milvus store on a real milvus-lite file: ids are data, never expression text (quotes,
backslashes and brackets in ids), a failed or killed `index build --store milvus` leaves nothing a
re-run trips over, filter values with every escape Milvus reads round-trip, and the store's parts
by hand: search parameters, the exact fallback, stored rows, batched writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from fashion_cir.cli import app
from fashion_cir.errors import DataError, FashionCIRError
from fashion_cir.retrieval import build_index, milvus_store, open_index, parse_filter, remove_from_index
from fashion_cir.retrieval.filters import MAX_DEPTH
from fashion_cir.retrieval.milvus_store import PENDING, _interrupted_build, client_for, parse_index_option
from support.serving import synthetic_catalog

runner = CliRunner()
ODD_IDS = ["a'b", 'c"d', "e] or id not in [", "f'] or id not in ['"]
INJECTIONS = ["x'] or id not in ['", "x'] or path like '/%' and id not in ['", "x'", 'x"', 'x" or ""=="']


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """12 drawings, four of them saved under ids full of quotes and brackets."""
    folder = tmp_path_factory.mktemp("odd") / "images"
    paths, metadata = synthetic_catalog(folder, 12)
    for number, odd in enumerate(ODD_IDS):
        old = f"item-{number:03d}"
        paths[odd] = paths.pop(old).rename(folder / f"{odd}.jpg")
        metadata[odd] = metadata.pop(old)
    return paths, metadata


def test_ids_are_data_not_expressions(tmp_path, catalog, tiny_model):
    """Issue 22 item 2: get(ids=...) quoted ids without escaping: ``x'] or id not in ['`` found
    another item, ``x'`` was a 500, and a catalog file named a'b.jpg crashed the build."""
    paths, metadata = catalog
    index = build_index(
        tmp_path / "index", tiny_model, paths, metadata, store=f"milvus:{tmp_path / 'm.db'}", progress=False
    )
    assert sorted(index.ids) == sorted(paths)
    for odd in ODD_IDS:
        assert odd in index and index.metadata[odd] == metadata[odd] and index.paths[odd] == paths[odd].resolve()
    for probe in INJECTIONS:
        assert probe not in index and index.metadata.get(probe) is None and probe not in index.paths
        with pytest.raises(DataError, match="unknown catalog id"):
            index.vector(probe)
    query = index.vector("a'b") / np.linalg.norm(index.vector("a'b"))
    hits = index.search_vectors(query[None], 12, exclude=ODD_IDS[1:])[0]
    assert {h.id for h in hits} == set(paths) - set(ODD_IDS[1:]) and hits[0].id == "a'b"
    _, removed, unknown = remove_from_index(index.folder, [INJECTIONS[0], "a'b", 'c"d'])
    assert removed == ["a'b", 'c"d'] and unknown == [INJECTIONS[0]]
    assert len(open_index(index.folder)) == 10


def test_cli_build_and_remove_with_odd_ids(tmp_path, catalog):
    """Issue 22 item 2: `index build --store milvus` over a'b.jpg and `index remove IDX "x'"` ended in tracebacks."""
    paths, _ = catalog
    folder, spec = tmp_path / "index", f"milvus:{tmp_path / 'm.db'}"
    images = paths["a'b"].parent
    result = runner.invoke(
        app,
        [
            "index",
            "build",
            str(folder),
            "--images",
            str(images),
            "--backbone",
            "tiny",
            "--store",
            spec,
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "indexed 12 images" in result.output
    result = runner.invoke(app, ["index", "remove", str(folder), "x'", "a'b"])
    assert result.exit_code == 0, result.output
    assert 'removed 1 items; index now holds 11; 1 ids were not in the index, first: "x\'"' in result.output
    result = runner.invoke(app, ["index", "remove", str(folder), "x\\"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "invalid image id 'x\\\\': an id is a file name without folders" in result.output


def test_a_failed_build_drops_its_collection(tmp_path, catalog, tiny_model):
    """Issue 22 item 2: a build that failed after creating its collection left it behind, so the
    re-run said "already exists" (and there was no index.json to remove it with)."""
    paths, metadata = catalog
    folder, uri = tmp_path / "index", str(tmp_path / "m.db")
    too_big = {**metadata, "item-005": {**metadata["item-005"], "description": "x" * 70_000}}
    with pytest.raises(DataError, match="metadata of item 'item-005' is 70"):
        build_index(
            folder, tiny_model, paths, too_big, store=f"milvus:{uri}", milvus={"collection": "shop"}, progress=False
        )
    assert not client_for(uri).has_collection("shop")
    assert not (folder / "index.json").exists() and not (folder / PENDING).exists()
    index = build_index(
        folder, tiny_model, paths, metadata, store=f"milvus:{uri}", milvus={"collection": "shop"}, progress=False
    )
    assert len(index) == 12 and not (folder / PENDING).exists()


KILLED_BUILD = """
import os, signal, sys
from fashion_cir.models.cir import load_model
from fashion_cir.retrieval import build_index, milvus_store

def killed(*args, **kwargs):  # the process dies between creating the collection and filling it
    os.kill(os.getpid(), signal.SIGKILL)

milvus_store.MilvusIndex.add_features = killed
build_index(sys.argv[1], load_model(backbone="tiny"), sys.argv[2], store="milvus:" + sys.argv[3], progress=False)
"""


def test_a_killed_build_is_resumed_by_the_rerun(tmp_path, catalog, tiny_model):
    """Issue 22 item 2: after a kill -9 mid-build, the orphan collection made every re-run fail."""
    paths, _ = catalog
    folder, uri = tmp_path / "index", str(tmp_path / "m.db")
    images = paths["a'b"].parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BUILD, str(folder), str(images), uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (folder / PENDING).is_file() and not (folder / "index.json").exists()
    index = build_index(folder, tiny_model, images, store=f"milvus:{uri}", progress=False)
    assert len(index) == 12 and not (folder / PENDING).exists()
    other = tmp_path / "other"  # a folder whose build did not create the collection may not take it
    shutil.copytree(folder, other)
    (other / "index.json").unlink()
    (other / PENDING).write_text(json.dumps({"uri": uri, "collection": "someone_else"}))
    with pytest.raises(DataError, match="already exists"):
        build_index(
            other, tiny_model, images, store=f"milvus:{uri}", milvus={"collection": index.collection}, progress=False
        )
    assert len(open_index(folder)) == 12


def test_filter_values_with_every_escape_round_trip(tmp_path, catalog, tiny_model):
    """Values are quoted by milvus_literal as milvus-lite reads them, and the deepest filter allowed runs."""
    paths, metadata = catalog
    values = ['say "hi"', "it's", "back\\slash", "two\nlines", "tab\there", "x' or m_color != '"]
    odd = {i: {**m, "color": values[n % len(values)]} for n, (i, m) in enumerate(metadata.items())}
    index = build_index(tmp_path / "index", tiny_model, paths, odd, store=f"milvus:{tmp_path / 'm.db'}", progress=False)
    query = index.vector("item-007") / np.linalg.norm(index.vector("item-007"))
    for value in values:
        text = 'color == "' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'  # the grammar's escapes
        expected = {i for i, m in odd.items() if m["color"] == value}
        hits = index.search_vectors(query[None], 12, filter=parse_filter(text, index.fields))[0]
        assert {h.id for h in hits} == expected
    comparison = 'color == "it\'s"'
    for text in (
        "not " * MAX_DEPTH + comparison,
        "(" * MAX_DEPTH + comparison + ")" * MAX_DEPTH,
        "not (" * (MAX_DEPTH // 2) + comparison + ")" * (MAX_DEPTH // 2),
    ):
        parsed = parse_filter(text, index.fields)
        expected = {i for i, m in odd.items() if parsed.matches(m)}
        assert {h.id for h in index.search_vectors(query[None], 12, filter=parsed)[0]} == expected


def test_a_manifest_cannot_make_milvus_create_files(tmp_path, catalog, tiny_model):
    """Issue 22 item 9: opening an index created folders and a milvus-lite .db wherever its
    manifest's uri said."""
    paths, metadata = catalog
    folder = build_index(
        tmp_path / "index", tiny_model, paths, metadata, store=f"milvus:{tmp_path / 'm.db'}", progress=False
    ).folder
    good = json.loads((folder / "index.json").read_text())
    elsewhere = tmp_path / "elsewhere" / "deeper" / "new.db"
    for change, message in [
        ({"uri": str(elsewhere)}, f"names the milvus-lite file {elsewhere}, which does not exist"),
        ({"uri": "m.db"}, "names 'm.db': not an absolute .db path or a server URI"),
        ({"uri": str(tmp_path / "x" / ".." / "m.db")}, "not an absolute .db path"),
        ({"uri": 7}, "lacks the text 'uri'"),
        ({"collection": "a; drop"}, "names a bad collection 'a; drop'"),
    ]:
        (folder / "index.json").write_text(json.dumps({**good, "store": {**good["store"], **change}}))
        with pytest.raises(DataError) as error:
            open_index(folder)
        assert f"{folder / 'index.json'}: field 'store' " in str(error.value) and message in str(error.value)
    assert not (tmp_path / "elsewhere").exists()
    (folder / "index.json").write_text(json.dumps(good))
    assert len(open_index(folder)) == 12


def test_a_manifest_whose_blocks_the_collection_does_not_hold_is_refused(tmp_path, catalog, tiny_model):
    """A collection holds vectors of its build's full item width; a manifest naming other blocks
    (edited, or pointed at another build's collection) is refused when it opens, not at the first search."""
    folder = build_index(
        tmp_path / "index", tiny_model, *catalog, store=f"milvus:{tmp_path / 'm.db'}", progress=False
    ).folder
    manifest = json.loads((folder / "index.json").read_text())
    assert manifest["blocks"] == {"image": 32}
    manifest["blocks"] = {"image": 32, "attributes": 36}
    (folder / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DataError,
        match=r"holds 32-value vectors but the manifest's blocks \{'image': 32, 'attributes': 36\} make 68; rebuild",
    ):
        open_index(folder)
    manifest["blocks"] = {"image": 32}
    (folder / "index.json").write_text(json.dumps(manifest))
    index = open_index(folder)
    with pytest.raises(DataError, match="stores rows of 32 values .* got 48"):  # a writer given rows of another width
        index.add_features(["x"], np.ones((1, 48), np.float32), {}, {"x": catalog[0]["item-004"]})
    assert len(index) == 12


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_each_index_type_searches_with_its_own_parameters(tmp_path, catalog, tiny_model):
    """IVF indexes search ``nprobe`` lists, HNSW with ``ef`` = the manifest's ef_search, FLAT with
    none; all by inner product. With every list probed, IVF answers exactly what brute force does."""
    paths, metadata = catalog
    built = {
        kind: build_index(
            tmp_path / kind,
            tiny_model,
            paths,
            metadata,
            store=f"milvus:{tmp_path / 'm.db'}",
            milvus={"index": option},
            nprobe=4,
            ef_search=20,
            progress=False,
        )
        for kind, option in (("flat", "FLAT"), ("ivf", "IVF_FLAT,nlist=4"), ("hnsw", "HNSW,M=8"))
    }
    assert built["flat"]._search_params() == {"metric_type": "IP", "params": {}}
    assert built["ivf"]._search_params() == {"metric_type": "IP", "params": {"nprobe": 4}}
    assert built["hnsw"]._search_params() == {"metric_type": "IP", "params": {"ef": 20}}
    ids = sorted(paths)
    rows = _unit(built["ivf"].stored_rows(ids))
    queries = _unit(np.random.default_rng(0).standard_normal((3, rows.shape[1])).astype(np.float32))
    for query, hits in zip(queries, built["ivf"].search_vectors(queries, 5)):
        order = np.argsort(-(rows @ query), kind="stable")[:5]
        assert [h.id for h in hits] == [ids[i] for i in order]
        np.testing.assert_allclose([h.score for h in hits], (rows @ query)[order], atol=1e-5)


def test_exact_ranking_and_stored_rows_by_hand(tmp_path, catalog, tiny_model):
    """The exact fallback ranks the allowed rows by inner product, best first, k of them, each
    with its metadata; stored rows come back in the order asked (repeats too) as float32, with
    the image block's norm restored, and an unknown id is named."""
    paths, metadata = catalog
    index = build_index(
        tmp_path / "index", tiny_model, paths, metadata, store=f"milvus:{tmp_path / 'm.db'}", progress=False
    )
    ids = sorted(paths)
    rows = index.stored_rows(ids)
    assert rows.dtype == np.float32 and index.vector(ids[0]).dtype == np.float32
    np.testing.assert_allclose(rows, np.stack([index.vector(i) for i in ids]), rtol=1e-6)
    asked = [ids[3], ids[0], ids[3]]
    np.testing.assert_array_equal(index.stored_rows(asked), rows[[3, 0, 3]])
    with pytest.raises(DataError, match="unknown catalog id 'nope'"):
        index.stored_rows([ids[1], "nope"])
    query = _unit(rows[5])
    scores = _unit(rows) @ query
    parsed = parse_filter('color != "red"', index.fields)
    allowed = np.array([parsed.matches(metadata[i]) for i in ids])
    for expression, mask in (("", np.ones(len(ids), bool)), (parsed.to_milvus(milvus_store.FIELD_PREFIX), allowed)):
        hits = index._exact(query, 4, expression)
        order = np.argsort(-np.where(mask, scores, -np.inf), kind="stable")[:4]
        assert [h.id for h in hits] == [ids[i] for i in order], expression
        np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
        assert [h.metadata for h in hits] == [metadata[ids[i]] for i in order]
    with pytest.raises(KeyError) as unknown:
        index.metadata["nope"]
    assert unknown.value.args == ("nope",)


def test_writes_go_in_batches(tmp_path, catalog, tiny_model, monkeypatch):
    """Inserts, upserts and deletes send at most BATCH rows a call (here 2), every row once."""
    paths, metadata = catalog
    index = build_index(
        tmp_path / "index", tiny_model, paths, metadata, store=f"milvus:{tmp_path / 'm.db'}", progress=False
    )
    ids = sorted(paths)[:5]
    rows = index.stored_rows(ids)
    monkeypatch.setattr(milvus_store, "BATCH", 2)
    sent: dict[str, list[int]] = {"upsert": [], "delete": []}
    client = index.client
    for name in sent:
        method = getattr(client, name)

        def counted(*args, _name=name, _method=method, **options):
            batch = args[1] if len(args) > 1 else options.get("data", options.get("filter"))
            sent[_name].append(len(batch) if _name == "upsert" else batch.count(",") + 1)
            return _method(*args, **options)

        monkeypatch.setattr(client, name, counted)
    index.upsert_features(ids, rows, metadata, paths)
    assert index.remove(ids + ["nope"]) == ids
    assert sent == {"upsert": [2, 2, 1], "delete": [2, 2, 1]}
    assert len(index) == len(paths) - 5


def test_interrupted_builds_are_told_by_their_marker(tmp_path):
    """Only a folder without a manifest whose pending marker names this very uri and collection was
    left by a killed build (a re-run may drop that collection); anything else is not."""
    folder = tmp_path / "index"
    folder.mkdir()
    assert not _interrupted_build(folder, "/m.db", "c1")  # no marker
    (folder / PENDING).write_text(json.dumps({"uri": "/m.db", "collection": "c1"}), encoding="utf-8")
    assert _interrupted_build(folder, "/m.db", "c1")
    assert not _interrupted_build(folder, "/m.db", "c2") and not _interrupted_build(folder, "/other.db", "c1")
    (folder / PENDING).write_text("{torn", encoding="utf-8")
    assert not _interrupted_build(folder, "/m.db", "c1")
    (folder / PENDING).write_text(json.dumps({"uri": "/m.db", "collection": "c1"}), encoding="utf-8")
    (folder / "index.json").write_text("{}")
    assert not _interrupted_build(folder, "/m.db", "c1")  # the build finished


def test_a_new_milvus_lite_file_gets_its_folders_and_a_missing_pymilvus_is_named(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "er" / "m.db"
    assert client_for(str(path)) is client_for(str(path))
    assert path.parent.is_dir()
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(FashionCIRError) as missing:
        client_for(str(tmp_path / "other.db"))
    assert str(missing.value) == (
        "the milvus store needs pymilvus (and milvus-lite for .db files): pip install 'fashion-cir[milvus]'"
    )


def test_index_options_fill_in_the_defaults_of_their_type():
    assert parse_index_option("flat") == {"index_type": "FLAT", "index_params": {}}
    assert parse_index_option(" ivf_flat ") == {"index_type": "IVF_FLAT", "index_params": {"nlist": 1024}}
    assert parse_index_option("IVF_FLAT, nlist = 256") == {"index_type": "IVF_FLAT", "index_params": {"nlist": 256}}
    assert parse_index_option("HNSW,M=32") == {"index_type": "HNSW", "index_params": {"M": 32, "efConstruction": 200}}
    with pytest.raises(DataError) as bad:
        parse_index_option("HNSW,M=big")
    assert str(bad.value) == "bad Milvus index option 'M=big' in 'HNSW,M=big': expected NAME=INTEGER"


def test_collections_are_named_after_their_folder_and_never_taken_over(tmp_path, catalog, tiny_model):
    """Without --milvus-collection a build's collection is ``fashion_cir_`` + the folder's name
    (other characters as ``_``); a second build into the same collection is refused, naming it."""
    paths, metadata = catalog
    store = f"milvus:{tmp_path / 'm.db'}"
    index = build_index(tmp_path / "my-index.v2", tiny_model, paths, metadata, store=store, progress=False)
    assert index.config["store"]["collection"] == "fashion_cir_my_index_v2"
    assert sorted(index.metadata) == sorted(paths) and len(index.metadata) == len(paths)
    with pytest.raises(DataError) as taken:
        build_index(
            tmp_path / "other",
            tiny_model,
            paths,
            metadata,
            store=store,
            milvus={"collection": "fashion_cir_my_index_v2"},
        )
    assert str(taken.value) == (
        f"Milvus collection 'fashion_cir_my_index_v2' already exists at {tmp_path / 'm.db'}; "
        "choose another with --milvus-collection, or rebuild with --overwrite"
    )
    with pytest.raises(DataError) as bad:
        build_index(tmp_path / "third", tiny_model, paths, metadata, store=store, milvus={"collection": "9lives"})
    assert str(bad.value) == (
        "bad Milvus collection name '9lives': letters, digits and underscores, not starting with a digit"
    )


def test_any_metadata_is_kept_and_the_manifest_counts_what_is_saved(tmp_path, catalog, tiny_model):
    """An item without metadata stores ``{}``, a value JSON cannot hold (a date) its text (and
    filters as that text; it was a traceback), a long
    filter field is cut at a quarter of Milvus's text limit (its metadata stays whole); the manifest
    counts the items after every save, and the metadata mapping iterates over every id."""
    import datetime

    paths, metadata = catalog
    metadata = {i: dict(m) for i, m in metadata.items()}
    bare, dated, long_text = sorted(paths)[:3]
    del metadata[bare]
    metadata[dated]["sold"] = datetime.date(2026, 12, 7)
    metadata[long_text]["color"] = "é" * 20_000  # 40,000 bytes of UTF-8: under the limit, over a quarter of it
    index = build_index(
        tmp_path / "index", tiny_model, paths, metadata, store=f"milvus:{tmp_path / 'm.db'}", progress=False
    )
    assert index.metadata[bare] == {} and index.metadata[dated]["sold"] == "2026-12-07"
    assert index.metadata[long_text]["color"] == "é" * 20_000
    stored = index.client.get(index.collection, ids=[long_text], output_fields=[milvus_store.FIELD_PREFIX + "color"])
    assert stored[0][milvus_store.FIELD_PREFIX + "color"] == "é" * (milvus_store.MAX_TEXT // 4)
    assert sorted(index.metadata) == sorted(paths)
    sold = parse_filter('sold == "2026-12-07"', index.fields)
    assert [h.id for h in index.search_vectors(index.stored_rows([dated])[:, :32], 5, filter=sold)[0]] == [dated]
    assert json.loads((index.folder / "index.json").read_text())["count"] == len(paths)
    remove_from_index(index.folder, [bare, dated])
    assert json.loads((index.folder / "index.json").read_text())["count"] == len(paths) - 2
