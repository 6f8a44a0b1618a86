"""The FAISS store (retrieval/faiss_store.py) on random vectors, without a model: searches against a
brute-force ranking (filters, exclusions, k past the end, approximate indexes), adds, upserts and
removes, the saved folder, and every refusal on load as its one-line message."""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path

import faiss
import numpy as np
import pytest

from fashion_cir.errors import DataError, ModelError
from fashion_cir.retrieval.faiss_store import (
    AUTO_EXACT_BELOW,
    CatalogIndex,
    _new_faiss_index,
    _search_parameters,
    _set_search_params,
    resolve_factory,
)
from fashion_cir.retrieval.filters import field_text, parse_filter
from fashion_cir.retrieval.manifest import FORMAT

DIM = 8
COLORS = ["red", "blue", "black"]


def config(root: Path, factory: str = "Flat", **extra) -> dict:
    return {
        "format": FORMAT,
        "store": {"kind": "faiss", "uri": None},
        "factory": factory,
        "feature_dim": DIM,
        "nprobe": 16,
        "ef_search": 64,
        "backbone": "random",
        "image_fingerprint": "f",
        "root": str(root),
        "count": 0,
        "data": None,
        "fields": ["color", "kids", "size"],  # what build_index records from the metadata
        **extra,
    }


def catalog(root: Path, n: int, seed: int = 0, width: int = DIM):
    rng = np.random.default_rng(seed)
    ids = [f"i{n:03d}" for n in range(n)]
    rows = rng.normal(size=(n, width)).astype(np.float32) * rng.uniform(0.5, 3, size=(n, 1)).astype(np.float32)
    metadata = {i: {"color": COLORS[k % 3], "size": k % 4, "kids": k % 5 == 0} for k, i in enumerate(ids)}
    del metadata[ids[1]]["color"]  # one item without a colour
    paths = {i: root / "img" / f"{i}.jpg" for i in ids}
    return ids, rows, metadata, paths


def built(tmp_path: Path, n: int = 30, factory: str = "Flat", **extra) -> tuple[CatalogIndex, tuple]:
    ids, rows, metadata, paths = data = catalog(tmp_path, n, width=DIM + extra.get("extra_width", 0))
    cfg = config(tmp_path, factory, **{k: v for k, v in extra.items() if k != "extra_width"})
    index = CatalogIndex.create(tmp_path / "index", cfg, rows)
    index.add_features(ids, rows, metadata, paths)
    index.save()
    return index, data


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def brute_force(ids, rows, metadata, query, k, keep=lambda m: True, exclude=()):
    scores = {
        i: float(unit(rows[n : n + 1, :DIM])[0] @ query[:DIM] + rows[n, DIM:] @ query[DIM:]) for n, i in enumerate(ids)
    }
    allowed = [i for i in ids if keep(metadata.get(i, {})) and i not in exclude]
    return sorted(allowed, key=lambda i: -scores[i])[:k], scores


def test_resolve_factory():
    assert resolve_factory("HNSW32", 10) == "HNSW32" and resolve_factory("Flat", 10**7) == "Flat"
    assert resolve_factory("auto", 0) == "Flat" and resolve_factory("auto", AUTO_EXACT_BELOW - 1) == "Flat"
    # 4 sqrt(N) lists, rounded to a power of two: 4 sqrt(200000) = 1789 -> 2048; 4 sqrt(10^6) = 4000 -> 4096
    assert resolve_factory("auto", AUTO_EXACT_BELOW) == "IVF2048,Flat"
    assert resolve_factory("auto", 10**6) == "IVF4096,Flat" and resolve_factory("auto", 250_000) == "IVF2048,Flat"
    assert AUTO_EXACT_BELOW == 200_000


def test_faiss_indexes_from_factory_strings():
    vectors = unit(np.random.default_rng(1).normal(size=(40, DIM)).astype(np.float32))
    flat = _new_faiss_index("Flat", vectors)
    assert flat.metric_type == faiss.METRIC_INNER_PRODUCT and flat.d == DIM and flat.ntotal == 0
    ivf = _new_faiss_index("IVF4,Flat", vectors)
    assert ivf.is_trained and faiss.extract_index_ivf(ivf).nlist == 4 and ivf.ntotal == 0
    _set_search_params(ivf, 16, 64)
    assert faiss.extract_index_ivf(ivf).nprobe == 4  # at most the number of lists
    _set_search_params(ivf, 3, 64)
    assert faiss.extract_index_ivf(ivf).nprobe == 3
    hnsw = _new_faiss_index("HNSW8", vectors)
    _set_search_params(hnsw, 16, 77)
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 77
    selector = faiss.IDSelectorRange(0, 10)  # a filtered search keeps the index's own settings
    assert _search_parameters(ivf, selector).nprobe == 3 and _search_parameters(hnsw, selector).efSearch == 77
    assert type(_search_parameters(flat, selector)) is faiss.SearchParameters
    with pytest.raises(DataError) as error:
        _new_faiss_index("Flatt", vectors)
    assert str(error.value).startswith("bad FAISS factory string 'Flatt' (e.g. 'Flat', 'IVF256,Flat', 'HNSW32'): ")
    assert "\n" not in str(error.value)
    with pytest.raises(DataError) as error:
        _new_faiss_index("IVF64,Flat", vectors)
    assert str(error.value) == (
        "index 'IVF64,Flat' has 64 lists but the catalog has only 40 images to train them; use fewer lists "
        "(about sqrt(N), e.g. 'IVF6,Flat') or 'Flat'"
    )
    with pytest.raises(DataError, match=r"e\.g\. 'IVF1,Flat'"):
        _new_faiss_index("IVF4,Flat", vectors[:1])
    with pytest.raises(DataError, match=r"^could not train FAISS index 'PQ4' on 40 vectors: "):
        _new_faiss_index("PQ4", vectors)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8"])
def test_searches_match_a_brute_force_ranking(tmp_path, factory):
    index, (ids, rows, metadata, _) = built(tmp_path, 60, factory)
    if factory != "Flat":
        index.config["nprobe"] = 1  # probe one list: selective filters then need the exact fallback
        _set_search_params(index.faiss_index, 1, 64)
    rng = np.random.default_rng(7)
    queries = unit(rng.normal(size=(4, DIM)).astype(np.float32))
    cases = [
        (None, (), lambda m: True),
        (parse_filter('color == "red"'), (), lambda m: m.get("color") == "red"),
        (parse_filter('color == "" or kids == true'), ("i000",), lambda m: "color" not in m or m["kids"]),
        (None, ("i003", "i004", "nope"), lambda m: True),
        (
            parse_filter('size == 3 and not color in ["blue"]'),
            ("i007",),
            lambda m: m["size"] == 3 and m.get("color") != "blue",
        ),
    ]
    for filter, exclude, keep in cases:
        for k in (1, 5, 60, 100):
            got = index.search_vectors(queries, k, exclude, filter)
            assert len(got) == len(queries)
            for query, hits in zip(queries, got):
                expected, scores = brute_force(ids, rows, metadata, query, k, keep, exclude)
                allowed = brute_force(ids, rows, metadata, query, 100, keep, exclude)[0]
                if factory == "Flat":
                    assert [h.id for h in hits] == expected, (filter, exclude, k)
                else:  # approximate: as many hits as allowed rows up to k (exactly ranked when FAISS finds fewer)
                    assert len(hits) == len(expected) and {h.id for h in hits} <= set(allowed), (factory, filter, k)
                    assert len({h.id for h in hits}) == len(hits)
                    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
                for hit in hits:
                    assert hit.score == pytest.approx(scores[hit.id], abs=1e-5)
                    assert hit.metadata == metadata[hit.id]
    assert index.search_vectors(queries[:2], 0) == [[], []]
    assert index.search_vectors(queries[:2], 5, filter=parse_filter('color == "green"')) == [[], []]
    if factory == "Flat":  # queries given as float64 lists are converted
        top = index.search_vectors(queries[:1].astype(np.float64).tolist(), 2)[0][0].id
        assert top == brute_force(ids, rows, metadata, queries[0], 1)[0][0]


def test_add_upsert_remove_and_reload(tmp_path):
    index, (ids, rows, metadata, paths) = built(tmp_path, 12)
    folder = index.folder
    assert len(index) == 12 and "i003" in index and "zzz" not in index
    np.testing.assert_array_equal(index.vector("i005"), rows[5])
    assert index.fields == ["color", "kids", "size"] and index.config["count"] == 12
    first_data = index.config["data"]
    assert first_data == "data-000001" and sorted(p.name for p in folder.iterdir()) == ["data-000001", "index.json"]
    assert sorted(p.name for p in (folder / first_data).iterdir()) == sorted(
        ["ids.json", "metadata.json", "paths.json", "features.npy", "faiss.index"]
    )
    stored_paths = json.loads((folder / first_data / "paths.json").read_text())
    assert stored_paths["i000"] == os.path.join("img", "i000.jpg")  # relative to the catalog root
    with pytest.raises(DataError) as error:
        index.add_features(["i002", "new"], rows[:2], metadata, paths)
    assert str(error.value) == f"1 ids are already in index {folder}, first: 'i002'; use upsert"
    index.add_features([], rows[:0], {}, {})
    # upsert: one known item moves (new vector, metadata and image), one new item arrives
    moved = np.full(DIM, 0.5, dtype=np.float32)
    fresh = -moved
    index.upsert_features(
        ["i004", "new"],
        np.stack([moved, fresh]),
        {"i004": {"color": "green"}, "new": {"color": "pink"}},
        {"i004": tmp_path / "img" / "moved.jpg", "new": tmp_path / "img" / "new.jpg"},
    )
    assert index.ids[-1] == "new" and len(index) == 13 and index.rows["i004"] == 4
    np.testing.assert_array_equal(index.vector("i004"), moved)
    assert index.metadata["i004"] == {"color": "green"} and index.paths["i004"] == (tmp_path / "img" / "moved.jpg")
    assert index.search_vectors(unit(moved[None]), 1)[0][0].id == "i004"
    assert index.search_vectors(unit(fresh[None]), 1)[0][0].id == "new"
    assert [h.id for h in index.search_vectors(unit(moved[None]), 2, filter=parse_filter('color == "green"'))[0]] == [
        "i004"
    ]
    assert index.remove(["i000", "i004", "i004", "gone"]) == ["i000", "i004"]
    assert index.remove([]) == [] and len(index) == 11 and "i004" not in index and "i004" not in index.metadata
    assert "i004" not in index.paths and index.rows == {i: n for n, i in enumerate(index.ids)}
    assert index.faiss_index.ntotal == 11
    assert index.search_vectors(unit(moved[None]), 1, filter=parse_filter('color == "green"')) == [[]]
    (folder / ".data-000005.tmp").mkdir()  # a killed save's leftovers
    index.save()
    assert index.config["data"] == "data-000002" and index.config["count"] == 11
    assert sorted(p.name for p in folder.iterdir()) == ["data-000002", "index.json"]
    loaded = CatalogIndex.load(folder)
    assert loaded.ids == index.ids and loaded.metadata == index.metadata and loaded.paths == index.paths
    np.testing.assert_array_equal(loaded.features, index.features)
    query = unit(np.random.default_rng(3).normal(size=(2, DIM)).astype(np.float32))
    assert [[h.id for h in hits] for hits in loaded.search_vectors(query, 11)] == [
        [h.id for h in hits] for hits in index.search_vectors(query, 11)
    ]
    assert json.loads((folder / "index.json").read_text())["data"] == "data-000002"
    # the next number is one past the highest data folder there, never a reused one
    (folder / "data-000009").mkdir()
    loaded.save()
    assert loaded.config["data"] == "data-000010"
    assert loaded.remove(list(loaded.ids)) == index.ids and len(loaded) == 0 and loaded.faiss_index.ntotal == 0
    assert loaded.search_vectors(query, 3) == [[], []]


def test_removing_all_then_adding_keeps_rows_dense(tmp_path):
    index, (ids, rows, metadata, paths) = built(tmp_path, 5)
    index.remove(ids[:2])
    index.add_features(["x"], rows[:1], {"x": {"color": "red"}}, {"x": paths["i000"]})
    assert index.ids == ["i002", "i003", "i004", "x"] and index.rows["x"] == 3
    assert [h.id for h in index.search_vectors(unit(rows[:1]), 1, filter=parse_filter('color == "red"'))[0]] == ["x"]
    assert field_text(index.metadata["x"]["color"]) == "red"


def _rewrite(folder: Path, name: str, value) -> None:
    data = folder / json.loads((folder / "index.json").read_text())["data"]
    target = data / name
    if isinstance(value, bytes):
        target.write_bytes(value)
    elif name == "features.npy":
        np.save(target, value)
    else:
        target.write_text(json.dumps(value))


def test_refusals_on_load(tmp_path):
    index, (ids, rows, metadata, paths) = built(tmp_path, 6)
    folder = index.folder
    data = folder / "data-000001"
    pristine = {p.name: p.read_bytes() for p in data.iterdir()}
    manifest = (folder / "index.json").read_text()

    def restore():
        for name, content in pristine.items():
            (data / name).write_bytes(content)
        (folder / "index.json").write_text(manifest)

    cases = [
        ("ids.json", {"a": 1}, f"{data / 'ids.json'}: expected a JSON list, got dict; rebuild the index"),
        ("paths.json", [], f"{data / 'paths.json'}: expected a JSON object, got list; rebuild the index"),
        ("metadata.json", [], f"{data / 'metadata.json'}: expected a JSON object, got list; rebuild the index"),
        (
            "ids.json",
            ids[:5],
            f"{data / 'ids.json'}: expected 6 distinct id strings (the manifest's count), got 5 entries; rebuild the index",
        ),
        (
            "ids.json",
            [*ids[:5], 7],
            f"{data / 'ids.json'}: expected 6 distinct id strings (the manifest's count), got 6 entries; rebuild the index",
        ),
        (
            "ids.json",
            [*ids[:5], ids[0]],
            f"{data / 'ids.json'}: expected 6 distinct id strings (the manifest's count), got 6 entries; rebuild the index",
        ),
        (
            "paths.json",
            {**{i: f"img/{i}.jpg" for i in ids}, "i002": ""},
            f"{data / 'paths.json'}: the path of 'i002' ('') is not inside the catalog root {tmp_path}; rebuild the index",
        ),
        (
            "paths.json",
            {**{i: f"img/{i}.jpg" for i in ids}, "i002": 5},
            f"{data / 'paths.json'}: the path of 'i002' (5) is not inside the catalog root {tmp_path}; rebuild the index",
        ),
        (
            "paths.json",
            {i: f"img/{i}.jpg" for i in ids[1:]},
            f"{data / 'paths.json'}: the path of 'i000' (None) is not inside the catalog root {tmp_path}; rebuild the index",
        ),
        (
            "paths.json",
            {**{i: f"img/{i}.jpg" for i in ids}, "i003": f"{tmp_path}-other/x.jpg"},
            f"{data / 'paths.json'}: the path of 'i003' ('{tmp_path}-other/x.jpg') is not inside the catalog root "
            f"{tmp_path}; rebuild the index",
        ),
        (
            "features.npy",
            rows[:5],
            f"{data / 'features.npy'}: expected 6 x 8 float features, got shape (5, 8) (float32); rebuild the index",
        ),
        (
            "features.npy",
            rows.astype(np.int32),
            f"{data / 'features.npy'}: expected 6 x 8 float features, got shape (6, 8) (int32); rebuild the index",
        ),
        (
            "features.npy",
            np.zeros((6, 9)),
            f"{data / 'features.npy'}: expected 6 x 8 float features, got shape (6, 9) (float64)",
        ),
        ("features.npy", b"", f"corrupt feature file {data / 'features.npy'}: No data left in file; rebuild the index"),
        ("faiss.index", b"junk", f"corrupt FAISS file {data / 'faiss.index'}: "),
    ]
    for name, value, message in cases:
        _rewrite(folder, name, value)
        with pytest.raises(DataError) as error:
            CatalogIndex.load(folder)
        assert str(error.value).startswith(message) and "\n" not in str(error.value), (name, str(error.value))
        restore()
    assert CatalogIndex.load(folder).paths["i000"] == tmp_path / "img" / "i000.jpg"
    # absolute paths inside the root are kept; a FAISS file of another size is refused
    _rewrite(folder, "paths.json", {**{i: f"img/{i}.jpg" for i in ids}, "i001": str(tmp_path / "img" / "abs.jpg")})
    assert CatalogIndex.load(folder).paths["i001"] == tmp_path / "img" / "abs.jpg"
    restore()
    smaller = faiss.IndexFlatIP(DIM)
    smaller.add(unit(rows[:5]))
    faiss.write_index(smaller, str(data / "faiss.index"))
    with pytest.raises(DataError) as error:
        CatalogIndex.load(folder)
    assert str(error.value) == (
        f"{data / 'faiss.index'}: 5 vectors of dimension 8, but the manifest says 6 of dimension 8; rebuild the index"
    )
    restore()
    (data / "paths.json").unlink()
    with pytest.raises(DataError) as error:
        CatalogIndex.load(folder)
    assert str(error.value) == f"index {folder} is incomplete: {data} lacks ['paths.json']; rebuild it"
    restore()
    (folder / "index.json").write_text(manifest.replace('"kind": "faiss"', '"kind": "milvus"'))
    with pytest.raises(DataError) as error:
        CatalogIndex.load(folder)
    assert str(error.value) == f"{folder / 'index.json'}: a 'milvus' index; open it with open_index"


def test_the_model_is_checked_on_load(tmp_path, tiny_model):
    fingerprint = tiny_model.backbone.image_fingerprint()
    dim = tiny_model.backbone.feature_dim
    ids = ["a", "b"]
    rows = np.eye(2, dim, dtype=np.float32)
    cfg = {**config(tmp_path, image_fingerprint=fingerprint), "feature_dim": dim}
    index = CatalogIndex.create(tmp_path / "index", cfg, rows)
    index.add_features(ids, rows, {}, {i: tmp_path / f"{i}.jpg" for i in ids})
    index.save()
    assert len(CatalogIndex.load(tmp_path / "index", tiny_model)) == 2
    (tmp_path / "index" / "index.json").write_text(
        (tmp_path / "index" / "index.json").read_text().replace(fingerprint, "other")
    )
    with pytest.raises(ModelError, match="fingerprint other"):
        CatalogIndex.load(tmp_path / "index", tiny_model)
    narrow = {**config(tmp_path / "n", image_fingerprint=fingerprint)}
    small = CatalogIndex.create(tmp_path / "n" / "index", narrow, np.eye(2, DIM, dtype=np.float32))
    small.add_features(ids, np.eye(2, DIM, dtype=np.float32), {}, {i: tmp_path / "n" / f"{i}.jpg" for i in ids})
    small.save()
    with pytest.raises(ModelError) as error:
        CatalogIndex.load(tmp_path / "n" / "index", tiny_model)
    assert str(error.value) == (
        f"index {tmp_path / 'n' / 'index'} holds 8-d features but the model {tiny_model.backbone.spec} makes "
        f"{dim}-d ones; use the model it was built with"
    )


def test_rows_wider_than_the_image_block(tmp_path):
    """A matcher's description block is searched as stored, only the image block is normalised."""
    index, (ids, rows, metadata, _) = built(tmp_path, 20, blocks={"image": DIM, "description": 4}, extra_width=4)
    query = np.random.default_rng(9).normal(size=DIM + 4).astype(np.float32)
    hits = index.search_vectors(query[None], 20)[0]
    expected, scores = brute_force(ids, rows, metadata, query, 20)
    assert [h.id for h in hits] == expected
    assert CatalogIndex.load(index.folder).features.shape == (20, DIM + 4)


def test_factory_boundaries_and_messages():
    # 4 sqrt(397,000) = 2520 lists -> 2^11.30 -> 2048 (5 sqrt(N) would round up to 4096)
    assert resolve_factory("auto", 397_000) == "IVF2048,Flat"
    vectors = unit(np.random.default_rng(1).normal(size=(40, DIM)).astype(np.float32))
    assert _new_faiss_index("IVF4,Flat", vectors[:4]).is_trained  # as many images as lists is enough
    with pytest.raises(DataError) as error:
        _new_faiss_index("Flatt", vectors)
    reason = str(error.value).split("'HNSW32'): ", 1)[1]
    assert reason and reason != "None" and "Flatt" in reason


def test_saved_folder_details(tmp_path):
    ids, rows, metadata, paths = catalog(tmp_path / "a", 4)
    metadata["i000"]["added"] = datetime.date(2024, 1, 2)  # not JSON: stored as its text
    del metadata["i003"]
    cfg = config(tmp_path / "a")
    index = CatalogIndex.create(tmp_path / "index", cfg, rows.astype(np.float64))
    assert index.features.dtype == np.float32 and index.report == {}
    index.add_features(ids, rows.astype(np.float64), metadata, paths)
    assert index.features.dtype == np.float32 and index.metadata["i003"] == {}
    # an image outside the recorded root widens it
    index.add_features(["far"], rows[:1], {}, {"far": tmp_path / "b" / "far.jpg"})
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / ".data-000004.tmp").write_text("a file, not a folder")
    (tmp_path / "index" / "data-notes").write_text("not a data folder")
    (tmp_path / "index" / "data-120000").mkdir()
    index.save()
    manifest = json.loads((tmp_path / "index" / "index.json").read_text())
    assert manifest["root"] == str(tmp_path) and manifest["data"] == "data-120001"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", manifest["updated"])
    saved = json.loads((tmp_path / "index" / "data-120001" / "metadata.json").read_text(encoding="utf-8"))
    assert saved["i000"]["added"] == "2024-01-02"
    loaded = CatalogIndex.load(tmp_path / "index")
    assert loaded.paths["far"] == tmp_path / "b" / "far.jpg" and loaded.report == {}
    hits = loaded.search_vectors(unit(rows[3:4]), 5, filter=parse_filter('color != "red"'))[0]
    assert hits[0].id == "i003" and hits[0].metadata == {}
    assert [h.id for h in loaded.search_vectors(unit(rows[3:4]), 5, filter=parse_filter('season == ""'))[0]][
        0
    ] == "i003"
    assert loaded.remove(["i003"]) == ["i003"] and "i003" not in loaded.metadata


def test_manifest_fields_store_and_search_settings_on_load(tmp_path):
    index, (ids, rows, metadata, _) = built(tmp_path, 40, "IVF4,Flat")
    manifest = json.loads((index.folder / "index.json").read_text())
    del manifest["fields"], manifest["store"]
    manifest["nprobe"] = 2
    (index.folder / "index.json").write_text(json.dumps(manifest))
    loaded = CatalogIndex.load(index.folder)
    assert loaded.fields == ["color", "kids", "size"] and loaded.store_kind == "faiss"
    assert faiss.extract_index_ivf(loaded.faiss_index).nprobe == 2
    manifest["store"] = {}
    manifest["nprobe"] = 4  # every list: a filtered IVF search is then exact
    (index.folder / "index.json").write_text(json.dumps(manifest))
    loaded = CatalogIndex.load(index.folder)
    keep = parse_filter("kids == false")
    for query in unit(np.random.default_rng(5).normal(size=(10, DIM)).astype(np.float32)):
        for k in (3, 5, 8):
            expected, _ = brute_force(ids, rows, metadata, query, k, lambda m: not m["kids"])
            assert [h.id for h in loaded.search_vectors(query[None], k, filter=keep)[0]] == expected


def test_more_refusals_on_load(tmp_path, monkeypatch):
    index, (ids, rows, _, _) = built(tmp_path, 6)
    data = index.folder / "data-000001"
    pristine = {p.name: p.read_bytes() for p in data.iterdir()}
    for name, what in (("ids.json", "index ids"), ("paths.json", "index paths"), ("metadata.json", "index metadata")):
        (data / name).write_text("{")
        with pytest.raises(DataError, match=rf"^malformed {what} {re.escape(str(data / name))}: "):
            CatalogIndex.load(index.folder)
        (data / name).write_bytes(pristine[name])
    np.save(data / "features.npy", np.array([object()] * 6), allow_pickle=True)
    with pytest.raises(DataError) as error:
        CatalogIndex.load(index.folder)
    assert str(error.value).startswith(f"corrupt feature file {data / 'features.npy'}: Object arrays cannot be loaded")
    with open(data / "features.npy", "wb") as handle:
        np.savez(handle, x=rows)  # a zip archive, not an array
    with pytest.raises(DataError) as error:
        CatalogIndex.load(index.folder)
    assert str(error.value) == (
        f"{data / 'features.npy'}: expected 6 x 8 float features, got shape None (?); rebuild the index"
    )
    np.save(data / "features.npy", rows.astype(np.float64))
    assert CatalogIndex.load(index.folder).features.dtype == np.float32
    (data / "faiss.index").write_bytes(b"junk")
    with pytest.raises(DataError) as error:
        CatalogIndex.load(index.folder)
    assert not str(error.value).endswith(": None") and len(str(error.value)) > len(f"corrupt FAISS file {data}") + 20
    (data / "faiss.index").write_bytes(pristine["faiss.index"])

    def silent_failure(*args, **kwargs):
        raise EOFError()

    monkeypatch.setattr(np, "load", silent_failure)
    with pytest.raises(DataError) as error:
        CatalogIndex.load(index.folder)
    assert str(error.value) == f"corrupt feature file {data / 'features.npy'}: EOFError; rebuild the index"


def test_items_without_metadata(tmp_path):
    """metadata.json may lack an item (written by hand): it reads as no fields, and upserts and
    removals of items given without metadata keep working."""
    index, (ids, rows, _, _) = built(tmp_path, 6)
    data = index.folder / "data-000001"
    stored = json.loads((data / "metadata.json").read_text())
    del stored["i002"]
    (data / "metadata.json").write_text(json.dumps(stored))
    loaded = CatalogIndex.load(index.folder)
    hits = loaded.search_vectors(unit(rows[2:3]), 6, filter=parse_filter('color == ""'))[0]
    assert [h.id for h in hits][0] == "i002" and hits[0].metadata == {}
    assert loaded.search_vectors(unit(rows[2:3]), 1)[0][0].metadata == {}
    loaded.upsert_features(["i003"], rows[3:4] * 2, {}, {"i003": tmp_path / "img" / "i003.jpg"})
    assert loaded.metadata["i003"] == {}
    assert loaded.remove(["i002"]) == ["i002"] and len(loaded) == 5
