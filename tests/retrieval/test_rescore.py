"""Two-stage search (issue 23 item 3) and compact, memory-mapped FAISS indexes (item 4), on a real
tiny catalog (the first 80 clothing photos with their MLLM attributes) and a model whose items are
[image | description | attributes]. An int8 IVF index answers with approximate scores; re-scoring
its candidates from the stored float32 rows gives back exactly what an exact Flat index finds,
filters and exclusions included, on FAISS and on Milvus. A memory-mapped index answers exactly as
the same index read into memory."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from fashion_cir.errors import DataError
from fashion_cir.retrieval import build_index, open_index, parse_filter, remove_from_index
from fashion_cir.retrieval.faiss_store import CatalogIndex
from fashion_cir.retrieval.folder import LiveIndex, index_info
from fashion_cir.retrieval.manifest import read_manifest
from fashion_cir.retrieval.query import SearchRequest, composed_search
from fashion_cir.retrieval.rescore import ExactScorer, RescoreQuery
from support.matcher import multi_block_model
from support.serving import demo_catalog

# reference (position in the sorted ids), caption, filter, exclude the reference
QUERIES = [
    (3, "is red", None, True),
    (11, "is a blue dress with long sleeves", 'category in ["dress", "t-shirt", "shirt"]', True),
    (20, "", 'color != "black"', False),
    (None, "a green jacket", None, False),
    (33, "is black and longer", 'color in ["black", "white", "blue"]', True),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rescore")
    model = multi_block_model(root / "tiny-bert")
    paths, metadata = demo_catalog(root / "images", 80)
    options = {"progress": False, "cache_dir": root / "cache"}
    exact = build_index(root / "flat", model, paths, metadata, factory="Flat", **options)
    compact = build_index(root / "ivf-sq8", model, paths, metadata, factory="IVF4,SQ8", nprobe=4, **options)
    return {"root": root, "model": model, "paths": paths, "metadata": metadata, "options": options} | {
        "exact": exact,
        "compact": compact,
        "ids": sorted(paths),
    }


def run(world, index, query, k=10, **options):
    reference, text, expression, exclude = query
    return composed_search(
        world["model"],
        index,
        item_id=None if reference is None else world["ids"][reference],
        text=text,
        k=k,
        exclude_reference=exclude,
        filter=parse_filter(expression, index.fields) if expression else None,
        **options,
    )


def assert_same(hits, expected, what) -> None:
    assert [h.id for h in hits] == [h.id for h in expected], what
    np.testing.assert_allclose([h.score for h in hits], [h.score for h in expected], rtol=0, atol=1e-5, err_msg=what)
    assert [h.metadata for h in hits] == [h.metadata for h in expected], what


def test_two_stage_on_an_int8_ivf_index_finds_the_exact_top_k(world):
    exact, compact = world["exact"], world["compact"]
    assert compact.config["factory"] == "IVF4,SQ8" and compact.config["candidates"] is None
    approximate_scores = 0
    for query in QUERIES:
        truth = run(world, exact, query).hits
        one_stage = run(world, compact, query).hits
        pool = {h.id for h in run(world, compact, query, k=29).hits}  # within the 30 candidates below
        assert {h.id for h in truth} <= pool, query  # the candidate set covers the true top 10
        approximate_scores += not np.allclose([h.score for h in one_stage], [h.score for h in truth], atol=1e-5)
        assert_same(run(world, compact, query, candidates=30).hits, truth, str(query))
        if query[2]:
            parsed = parse_filter(query[2], compact.fields)
            assert all(parsed.matches(world["metadata"][h.id]) for h in truth), query
    assert approximate_scores == len(QUERIES)  # int8 codes alone do not give the model's scores
    # pages: the candidate set grows to cover the page asked for
    page = run(world, compact, QUERIES[0], k=10, offset=20, candidates=12)
    truth = run(world, exact, QUERIES[0], k=10, offset=20)
    assert_same(page.hits, truth.hits, "page 3")
    assert page.more == truth.more


def test_the_index_setting_makes_every_search_two_stage_and_zero_turns_it_off(world):
    model, paths, metadata = world["model"], world["paths"], world["metadata"]
    folder = world["root"] / "two-stage"
    build_index(folder, model, paths, metadata, factory="SQ8", candidates=25, **world["options"])
    index = open_index(folder, model)
    assert index.config["candidates"] == 25 and index_info(folder)["candidates"] == 25
    for query in QUERIES[:3]:
        truth = run(world, world["exact"], query).hits
        assert_same(run(world, index, query).hits, truth, str(query))
        assert not np.allclose([h.score for h in run(world, index, query, candidates=0).hits], [h.score for h in truth])
    wide = run(world, index, QUERIES[0], k=40).hits  # more than the setting: the candidates grow to the page
    assert_same(wide, run(world, world["exact"], QUERIES[0], k=40).hits, "k above the setting")
    request = SearchRequest(item_id=world["ids"][3], text="is red", k=5, candidates=40)
    assert_same(request.run(model, index).hits, run(world, world["exact"], QUERIES[0], k=5).hits, "request")


def test_fewer_candidates_than_results_is_refused(world):
    with pytest.raises(DataError, match=r"candidates \(5\) must be at least the results asked for \(10\)"):
        run(world, world["compact"], QUERIES[0], candidates=5)
    with pytest.raises(DataError, match="candidates must be a positive number"):
        build_index(world["root"] / "x", world["model"], world["paths"], world["metadata"], candidates=0)
    manifest = world["exact"].folder / "index.json"
    good = manifest.read_text()
    try:
        for bad in ("0", "true", '"100"'):
            manifest.write_text(good.replace('"candidates": null', f'"candidates": {bad}'))
            with pytest.raises(DataError, match="field 'candidates' must be a positive int or null"):
                open_index(world["exact"].folder)
    finally:
        manifest.write_text(good)


class Reversed:
    """A second scorer that is not the model's: the exact score, negated."""

    def __init__(self, config):
        self.exact, self.seen = ExactScorer(config), []

    def scores(self, query: RescoreQuery, ids, rows):
        self.seen.append((query.parts is not None, len(ids), rows.shape))
        return -self.exact.scores(query, ids, rows)


def test_a_second_scorer_plugs_in_and_sees_the_query_parts_and_stored_rows(world):
    compact = world["compact"]
    scorer = Reversed(compact.config)
    hits = run(world, compact, QUERIES[1], k=5, candidates=20, rescorer=scorer).hits
    pool = run(world, world["exact"], QUERIES[1], k=20).hits  # the IVF index probes every list: the same 20
    assert scorer.seen == [(True, 20, (20, sum(compact.config["blocks"].values())))]
    assert [h.id for h in hits] == [h.id for h in pool[::-1][:5]]


def test_two_stage_on_milvus_finds_what_exact_faiss_finds(world):
    """On Milvus (IVF_FLAT) the second stage reads the candidates' rows in one query (the raw
    rows FAISS stores) and orders them as exact FAISS does, filters and exclusions included.
    (milvus-lite's IVF_SQ8 answers with exact scores here, so it would not show more.)"""
    model, paths, metadata = world["model"], world["paths"], world["metadata"]
    root = world["root"]
    index = build_index(
        root / "milvus",
        model,
        paths,
        metadata,
        store=f"milvus:{root / 'm.db'}",
        milvus={"index": "IVF_FLAT,nlist=4"},
        nprobe=4,
        **world["options"],
    )
    for query in QUERIES:
        assert_same(run(world, index, query, candidates=30).hits, run(world, world["exact"], query).hits, str(query))
    ids = world["ids"][:7]
    np.testing.assert_allclose(index.stored_rows(ids), world["exact"].stored_rows(ids), rtol=1e-5, atol=1e-6)


def _codes_mapped(index: faiss.Index) -> bool:
    """Whether FAISS reads the index's codes from the mapped file (vectors it does not own)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        largest = max(range(ivf.nlist), key=ivf.get_list_size)
        return not lists.codes.at(largest).is_owned
    inner = faiss.downcast_index(index)
    storage = faiss.downcast_index(inner.storage) if hasattr(inner, "storage") else inner
    return not storage.codes.is_owned


@pytest.mark.parametrize("factory", ["Flat", "SQfp16", "IVF4,SQ8", "HNSW8"])
def test_a_memory_mapped_index_answers_as_the_one_read_into_memory(world, factory):
    model, metadata = world["model"], world["metadata"]
    folder = world["root"] / f"mmap-{factory.replace(',', '-')}"
    build_index(folder, model, world["paths"], metadata, factory=factory, nprobe=4, mmap=True, **world["options"])
    loaded, mapped = open_index(folder, model), open_index(folder, model, read_only=True)
    assert isinstance(loaded, CatalogIndex) and isinstance(mapped, CatalogIndex)
    assert not loaded.mapped and mapped.mapped and isinstance(mapped.features, np.memmap)
    assert isinstance(LiveIndex(folder, model).current().features, np.memmap)  # the service maps it
    built = folder / read_manifest(folder)["data"]
    assert mapped.features.filename == (built / "features.npy").resolve()  # rows read from the file, not copied
    assert _codes_mapped(mapped.faiss_index) and not _codes_mapped(loaded.faiss_index)
    assert not CatalogIndex.load(folder, model).mapped  # opened by default as a writer does
    ids = world["ids"]
    np.testing.assert_array_equal(mapped.stored_rows(ids), loaded.stored_rows(ids))
    queries = np.random.default_rng(0).standard_normal((6, loaded.faiss_index.d)).astype(np.float32)
    parsed = parse_filter('color != "black"', loaded.fields)
    for k, expression in ((10, None), (30, parsed)):
        got, want = (index.search_vectors(queries, k, filter=expression) for index in (mapped, loaded))
        assert [[(h.id, h.score) for h in hits] for hits in got] == [[(h.id, h.score) for h in hits] for hits in want]
    for query in QUERIES:
        assert_same(
            run(world, mapped, query, candidates=30).hits, run(world, loaded, query, candidates=30).hits, factory
        )
    with pytest.raises(DataError, match="memory-mapped \\(read only\\)"):
        mapped.remove(ids[:1])
    assert remove_from_index(folder, ids[:1])[1] == ids[:1]  # writers read a mapped index into memory
    assert len(open_index(folder, model, read_only=True)) == 79 and len(mapped) == 80  # the mapped one still answers
    info = index_info(folder)
    data = folder / read_manifest(folder)["data"]
    assert info["mmap"] is True and info["factory"] == factory and info["count"] == 79
    assert info["vectors_bytes"] == (data / "faiss.index").stat().st_size
    assert info["rows_bytes"] == (data / "features.npy").stat().st_size > 79 * info["row_width"] * 4
    assert info["read_into_memory_bytes"] == sum(info["files"].values()) - info["vectors_bytes"] - info["rows_bytes"]
