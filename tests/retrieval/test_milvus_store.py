"""The Milvus store on a real milvus-lite file: ids are data, never expression text (quotes,
backslashes and brackets in ids), a failed or killed `index build --store milvus` leaves nothing a
re-run trips over, and filter values with every escape Milvus reads round-trip."""

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
from fashion_cir.errors import DataError
from fashion_cir.retrieval import build_index, open_index, parse_filter, remove_from_index
from fashion_cir.retrieval.filters import MAX_DEPTH
from fashion_cir.retrieval.milvus_store import PENDING, client_for
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
        DataError, match="holds 32-value vectors but the manifest's blocks .* make 68; rebuild the index"
    ):
        open_index(folder)
    manifest["blocks"] = {"image": 32}
    (folder / "index.json").write_text(json.dumps(manifest))
    index = open_index(folder)
    with pytest.raises(DataError, match="stores rows of 32 values .* got 48"):  # a writer given rows of another width
        index.add_features(["x"], np.ones((1, 48), np.float32), {}, {"x": catalog[0]["item-004"]})
    assert len(index) == 12
