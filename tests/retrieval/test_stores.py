"""One store test suite run on both vector stores: FAISS (in-process) and Milvus (milvus-lite, a
real embedded Milvus in a local .db file). Every answer is checked against brute force over the
raw features and the metadata, so a store that drops, misfilters or misranks items fails; a model
whose items are three blocks [image | description | attributes] answers alike on both."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fashion_cir.errors import DataError, ModelError
from fashion_cir.models.cir import load_model
from fashion_cir.retrieval import build_index, open_index, parse_filter, remove_from_index, search
from fashion_cir.retrieval.faiss_store import resolve_factory
from fashion_cir.retrieval.filters import FilterError
from fashion_cir.retrieval.index import add_to_index
from fashion_cir.retrieval.query import composed_search
from fashion_cir.retrieval.store import item_vectors, row_width
from support.matcher import multi_block_model
from support.serving import synthetic_catalog

STORES = ["faiss", "milvus"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    paths, metadata = synthetic_catalog(tmp_path_factory.mktemp("catalog") / "images", 60)
    for number, image_id in enumerate(paths):  # a bool field, and a field some items lack
        metadata[image_id]["in_stock"] = number % 3 != 0
        if number % 4:
            metadata[image_id]["season"] = ["summer", "winter"][number % 2]
    return paths, metadata


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


_names = iter(range(10**6))


def make_index(kind, workdir, model, paths, metadata, **options):
    """A fresh index on ``kind``: its own folder (and Milvus collection in the module's .db file)."""
    number = next(_names)
    store = "faiss" if kind == "faiss" else f"milvus:{workdir / 'milvus.db'}"
    milvus = {"collection": f"c{number}", **options.pop("milvus", {})}
    return build_index(
        workdir / f"index-{number}",
        model,
        paths,
        metadata,
        progress=False,
        store=store,
        milvus=milvus,
        cache_dir=workdir / "feature-cache",
        **options,
    )


def brute_force(features: dict[str, np.ndarray], query: np.ndarray, allowed, k: int) -> list[str]:
    ids = [i for i in features if i in allowed]
    vectors = np.stack([features[i] / np.linalg.norm(features[i]) for i in ids])
    order = np.argsort(-(vectors @ query), kind="stable")[:k]
    return [ids[i] for i in order]


@pytest.fixture(scope="module")
def raw_features(workdir, tiny_model, catalog):
    """Raw image features of every catalog item, from a FAISS build (the reference)."""
    index = make_index("faiss", workdir, tiny_model, *catalog)
    return {i: index.vector(i).copy() for i in index.ids}


@pytest.mark.parametrize("kind", STORES)
def test_build_reopen_count_and_lookups(kind, workdir, tiny_model, catalog, raw_features):
    paths, metadata = catalog
    built = make_index(kind, workdir, tiny_model, paths, metadata)
    index = open_index(built.folder, tiny_model)
    assert index.store_kind == kind and len(index) == 60 and sorted(index.ids) == sorted(paths)
    assert "item-007" in index and "nope" not in index
    assert index.metadata["item-007"] == metadata["item-007"] and index.metadata.get("nope", {}) == {}
    assert index.paths["item-007"] == paths["item-007"].resolve()
    np.testing.assert_allclose(index.vector("item-007"), raw_features["item-007"], rtol=1e-5, atol=1e-6)
    assert index.fields == ["category", "color", "description", "in_stock", "season"]
    query = raw_features["item-011"] / np.linalg.norm(raw_features["item-011"])
    hits = index.search_vectors(query[None], 10)[0]
    assert [h.id for h in hits] == brute_force(raw_features, query, paths, 10)
    assert hits[0].metadata == metadata[hits[0].id]


@pytest.mark.parametrize("kind", STORES)
def test_fingerprint_mismatch_is_refused(kind, workdir, tiny_model, catalog):
    index = make_index(kind, workdir, tiny_model, *catalog)
    with pytest.raises(ModelError, match="fingerprint .* tiny:1"):
        open_index(index.folder, load_model(backbone="tiny:1"))


FILTERS = [
    'category == "dress"',
    'category == "dress" and color != "black"',
    'color in ["red", "blue", "navy"] and not category == "t-shirt"',
    '(category == "hat" or category == "shoes") and in_stock == true',
    'season != "winter"',  # items without a season read as "" and stay
    'season == "summer" and color not in ["red"]',
    'in_stock == false or (color == "pink" and category in [\'pants\', "skirt"])',
]


@pytest.mark.parametrize("kind", STORES)
def test_filtered_search_matches_brute_force_and_returns_k(kind, workdir, tiny_model, catalog, raw_features):
    paths, metadata = catalog
    index = make_index(kind, workdir, tiny_model, paths, metadata)
    query = raw_features["item-003"] / np.linalg.norm(raw_features["item-003"])
    for text in FILTERS:
        parsed = parse_filter(text, index.fields)
        allowed = {i for i in paths if parsed.matches(metadata[i])}
        assert 0 < len(allowed) < 60, text
        for k in (5, 100):
            hits = index.search_vectors(query[None], k, filter=parsed)[0]
            assert [h.id for h in hits] == brute_force(raw_features, query, allowed, k), (text, k)
            assert len(hits) == min(k, len(allowed))
    parsed = parse_filter('category == "dress"', index.fields)
    excluded = brute_force(raw_features, query, {i for i in paths if metadata[i]["category"] == "dress"}, 3)
    hits = index.search_vectors(query[None], 10, exclude=excluded, filter=parsed)[0]
    assert not set(excluded) & {h.id for h in hits} and len(hits) == 7  # 10 dresses, 3 excluded
    composed = search(
        tiny_model, index, item_id="item-003", text="is green", k=4, filter=parsed, exclude_reference=True
    )
    assert len(composed) == 4 and all(h.metadata["category"] == "dress" for h in composed)


@pytest.mark.parametrize(
    "kind, options",
    [
        ("faiss", {"factory": "IVF8,Flat", "nprobe": 1}),
        ("milvus", {"milvus": {"index": "IVF_FLAT,nlist=8"}, "nprobe": 1}),
    ],
)
def test_selective_filter_on_an_approximate_index_still_returns_k(
    kind, options, workdir, tiny_model, catalog, raw_features
):
    paths, metadata = catalog
    index = make_index(kind, workdir, tiny_model, paths, metadata, **options)
    parsed = parse_filter('category == "shoes" and in_stock == true', index.fields)
    allowed = {i for i in paths if parsed.matches(metadata[i])}
    for image_id in ("item-000", "item-030", "item-055"):
        query = raw_features[image_id] / np.linalg.norm(raw_features[image_id])
        hits = index.search_vectors(query[None], len(allowed), filter=parsed)[0]
        assert {h.id for h in hits} == allowed


@pytest.mark.parametrize("kind", STORES)
def test_remove_and_upsert_persist(kind, workdir, tiny_model, catalog, raw_features):
    paths, metadata = catalog
    first = {i: paths[i] for i in list(paths)[:50]}
    index = make_index(kind, workdir, tiny_model, first, metadata)
    folder = index.folder
    _, removed, unknown = remove_from_index(folder, ["item-001", "item-002", "nope"])
    assert removed == ["item-001", "item-002"] and unknown == ["nope"]
    index = open_index(folder, tiny_model)
    assert len(index) == 48 and "item-001" not in index
    query = raw_features["item-001"] / np.linalg.norm(raw_features["item-001"])
    hits = index.search_vectors(query[None], 60)[0]
    assert len(hits) == 48 and "item-001" not in {h.id for h in hits}
    # upsert: item-005 now shows item-040's picture and new metadata; items 50-54 are new
    changed = {"item-005": paths["item-040"], **{i: paths[i] for i in list(paths)[50:55]}}
    new_meta = {i: metadata[i] for i in changed}
    new_meta["item-005"] = {**metadata["item-040"], "color": "purple"}
    updated = add_to_index(
        folder, tiny_model, changed, new_meta, replace=True, cache_dir=workdir / "feature-cache", progress=False
    )
    assert updated.report["replaced"] == 1 and updated.report["added"] == 5
    assert updated.paths["item-005"] == paths["item-040"].resolve()  # issue 24 item 2: /images served the old photo
    index = open_index(folder, tiny_model)
    assert len(index) == 53 and index.metadata["item-005"]["color"] == "purple"
    assert {i: index.paths[i] for i in changed} == {i: p.resolve() for i, p in changed.items()}
    assert index.paths["item-006"] == paths["item-006"].resolve()  # an item left alone keeps its photo
    np.testing.assert_allclose(index.vector("item-005"), raw_features["item-040"], rtol=1e-5, atol=1e-6)
    parsed = parse_filter('color == "purple"', index.fields)
    own = raw_features["item-040"] / np.linalg.norm(raw_features["item-040"])
    assert [h.id for h in index.search_vectors(own[None], 5, filter=parsed)[0]] == ["item-005"]
    top = index.search_vectors(own[None], 2)[0]
    assert {h.id for h in top} == {"item-005", "item-040"} and top[0].score == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(DataError, match="already in index .* use upsert"):
        index.add_features(["item-003"], raw_features["item-003"][None], metadata, paths)


@pytest.mark.parametrize("kind", STORES)
def test_unknown_filter_field_is_named(kind, workdir, tiny_model, catalog):
    index = make_index(kind, workdir, tiny_model, *catalog)
    with pytest.raises(FilterError, match="unknown field 'colour'"):
        parse_filter('colour == "red"', index.fields)


def test_milvus_store_spec_errors(tmp_path, tiny_model, catalog):
    with pytest.raises(DataError, match="must end in .db"):
        build_index(tmp_path / "a", tiny_model, *catalog, store="milvus:somewhere", progress=False)
    with pytest.raises(DataError, match="unknown store 'pinecone'"):
        build_index(tmp_path / "b", tiny_model, *catalog, store="pinecone", progress=False)
    folder = build_index(
        tmp_path / "c", tiny_model, *catalog, store=f"milvus:{tmp_path / 'x.db'}", progress=False
    ).folder
    manifest = json.loads((folder / "index.json").read_text())
    manifest["store"]["collection"] = "gone"
    (folder / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="collection 'gone' is missing"):
        open_index(folder)


def test_auto_factory_is_exact_for_small_catalogs_and_ivf_for_large(workdir, tiny_model, catalog):
    assert resolve_factory("auto", 60) == "Flat" and resolve_factory("auto", 199_999) == "Flat"
    assert resolve_factory("auto", 250_000) == "IVF2048,Flat" and resolve_factory("auto", 1_000_000) == "IVF4096,Flat"
    assert resolve_factory("HNSW32", 10) == "HNSW32"
    assert make_index("faiss", workdir, tiny_model, *catalog).config["factory"] == "Flat"


@pytest.mark.parametrize("kind", STORES)
def test_a_killed_manifest_write_leaves_nothing_behind(kind, workdir, tiny_model, catalog):
    """Issue 22 item 10: a kill -9 during the manifest write left .index.json.*.tmp forever."""
    index = make_index(kind, workdir, tiny_model, *catalog)
    leftover = index.folder / ".index.json.k9x_2ab.tmp"  # what atomic_write_bytes' temporary file is called
    leftover.write_text('{"format": "half a manif')
    _, removed, _ = remove_from_index(index.folder, ["item-001"])
    assert removed == ["item-001"] and not leftover.exists()
    assert not list(index.folder.glob(".index.json.*")) and len(open_index(index.folder)) == 59


# -- a model whose items are [image | description | attributes] (issue 23 item 1) -----------------
@pytest.fixture(scope="module")
def blocks_model(tmp_path_factory):
    return multi_block_model(tmp_path_factory.mktemp("tiny-bert"))


# reference id, caption, filter, exclude the reference: image+text, text alone, image alone, filtered
COMPOSED = [
    ("item-003", "is red", None, False),
    ("item-011", "is a blue skirt", "in_stock == true", True),
    ("item-020", "", None, False),
    (None, "a green hat", None, False),
    ("item-033", "is black and longer", 'category in ["dress", "skirt", "pants"]', True),
    ("item-044", "not pink", 'season != "winter"', True),
    ("item-005", "is purple", None, True),
]


def assert_same_hits(faiss_hits, milvus_hits, what) -> None:
    assert [h.id for h in milvus_hits] == [h.id for h in faiss_hits], what
    np.testing.assert_allclose(
        [h.score for h in milvus_hits], [h.score for h in faiss_hits], rtol=0, atol=1e-5, err_msg=str(what)
    )
    assert [h.metadata for h in milvus_hits] == [h.metadata for h in faiss_hits], what


def assert_stores_agree(model, faiss_index, milvus_index, metadata) -> None:
    """Both stores hold the same raw rows and answer every composed search (with and without
    filters), and random full-width queries, with the same ids and scores; FAISS's answers are
    brute force over its raw rows."""
    assert sorted(milvus_index.ids) == sorted(faiss_index.ids) and len(milvus_index) == len(faiss_index)
    ids = sorted(faiss_index.ids)
    faiss_rows = np.stack([faiss_index.vector(i) for i in ids])
    milvus_rows = np.stack([milvus_index.vector(i) for i in ids])
    assert milvus_rows.shape == faiss_rows.shape == (len(ids), row_width(faiss_index.config))
    np.testing.assert_allclose(milvus_rows, faiss_rows, rtol=1e-5, atol=1e-6)
    for reference, text, expression, exclude in COMPOSED:
        for k in (10, 60):
            parsed = parse_filter(expression, faiss_index.fields) if expression else None
            answers = [
                composed_search(
                    model, index, item_id=reference, text=text, k=k, filter=parsed, exclude_reference=exclude
                ).hits
                for index in (faiss_index, milvus_index)
            ]
            allowed = {
                i for i in ids if (parsed is None or parsed.matches(metadata[i])) and not (exclude and i == reference)
            }
            assert len(answers[0]) == min(k, len(allowed)), (reference, text, expression, k)
            assert_same_hits(*answers, (reference, text, expression, k))
    vectors = item_vectors(faiss_rows, faiss_index.config)
    queries = np.random.default_rng(3).standard_normal((4, vectors.shape[1])).astype(np.float32)
    parsed = parse_filter('color != "red" and in_stock == true', faiss_index.fields)
    allowed = np.array([parsed.matches(metadata[i]) for i in ids])
    for query, faiss_hits, milvus_hits in zip(
        queries,
        faiss_index.search_vectors(queries, 8, filter=parsed),
        milvus_index.search_vectors(queries, 8, filter=parsed),
    ):
        scores = np.where(allowed, vectors @ query, -np.inf)
        assert [h.id for h in faiss_hits] == [ids[i] for i in np.argsort(-scores, kind="stable")[:8]]
        assert_same_hits(faiss_hits, milvus_hits, "random full-width query")


def test_a_multi_block_model_builds_searches_and_changes_alike_on_both_stores(
    workdir, blocks_model, tiny_model, catalog
):
    """Issue 23 item 1: the Milvus store refused models that read descriptions or attributes. Built,
    searched (composed, filtered, excluded), added to, upserted, removed from and reopened, a
    three-block index answers on Milvus (FLAT) exactly as on FAISS (Flat)."""
    paths, metadata = catalog
    first = {i: paths[i] for i in list(paths)[:45]}
    built = {kind: make_index(kind, workdir, blocks_model, first, metadata) for kind in STORES}
    assert built["faiss"].config["factory"] == "Flat" and built["milvus"].config["store"]["index_type"] == "FLAT"
    for index in built.values():
        assert index.config["blocks"] == blocks_model.block_dims() and len(index.config["blocks"]) == 3
    stored = built["milvus"].client.describe_collection(built["milvus"].collection)["fields"]
    assert {f["name"]: f for f in stored}["vector"]["params"]["dim"] == row_width(built["faiss"].config) == 32 + 16 + 36
    assert_stores_agree(blocks_model, built["faiss"], built["milvus"], metadata)

    changed = dict(metadata)
    changed["item-005"] = {**metadata["item-040"], "color": "purple", "description": "a purple dress"}
    for kind, index in built.items():
        folder = index.folder
        added = add_to_index(
            folder,
            blocks_model,
            {i: paths[i] for i in list(paths)[45:52]},
            metadata,
            cache_dir=workdir / "feature-cache",
            progress=False,
        )
        assert added.report["added"] == 7, kind
        upserted = add_to_index(
            folder,
            blocks_model,
            {"item-005": paths["item-040"], "item-055": paths["item-055"]},
            changed,
            replace=True,
            cache_dir=workdir / "feature-cache",
            progress=False,
        )
        assert (upserted.report["replaced"], upserted.report["added"]) == (1, 1), kind
        _, removed, _ = remove_from_index(folder, ["item-001", "item-002"])
        assert removed == ["item-001", "item-002"], kind
    reopened = {kind: open_index(index.folder, blocks_model) for kind, index in built.items()}
    assert len(reopened["milvus"]) == 45 + 7 + 1 - 2 and reopened["milvus"].metadata["item-005"]["color"] == "purple"
    np.testing.assert_allclose(
        reopened["milvus"].vector("item-005")[:32], reopened["faiss"].vector("item-040")[:32], rtol=1e-5, atol=1e-6
    )
    assert_stores_agree(blocks_model, reopened["faiss"], reopened["milvus"], changed)
    purple = parse_filter('color == "purple"', reopened["milvus"].fields)
    for index in reopened.values():
        assert [
            h.id for h in search(blocks_model, index, item_id="item-040", text="is purple", k=3, filter=purple)
        ] == ["item-005"]


@pytest.mark.parametrize("kind", STORES)
def test_a_multi_block_index_refuses_other_models(kind, workdir, blocks_model, tiny_model, catalog):
    """The fingerprint and block checks work on a three-block index on either store: another image
    encoder, or the same one without the matcher and attribute space, is refused."""
    index = make_index(kind, workdir, blocks_model, *catalog)
    assert len(open_index(index.folder, blocks_model)) == 60
    with pytest.raises(ModelError, match="fingerprint .* tiny:1"):
        open_index(index.folder, load_model(backbone="tiny:1"))
    with pytest.raises(ModelError, match="holds items for"):
        open_index(index.folder, tiny_model)
