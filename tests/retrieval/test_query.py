"""One composed search (retrieval/query.py): pages of results and their exact "more" flag."""

from __future__ import annotations

import pytest

from fashion_cir.retrieval import build_index, parse_filter
from fashion_cir.retrieval.query import composed_search
from support.serving import synthetic_catalog


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("query")
    paths, metadata = synthetic_catalog(root / "images", 12)
    return build_index(root / "index", tiny_model, paths, metadata, progress=False), metadata


def test_more_is_true_only_when_a_further_page_has_results(small_index, tiny_model):
    """Issue 24 item 3: with exactly ``offset + k`` matches the next page is empty, so ``more`` is
    false; one match more and it is true. 11 items besides the reference; 10 colours of t-shirt."""
    index, metadata = small_index
    whole = composed_search(tiny_model, index, item_id="item-000", text="is blue", k=20, exclude_reference=True)
    assert len(whole.hits) == 11 and not whole.more
    order = [h.id for h in whole.hits]
    for k in (1, 4, 5, 6, 11, 12):
        for offset in (0, 5, 6, 7, 10, 11, 12):
            page = composed_search(
                tiny_model, index, item_id="item-000", text="is blue", k=k, offset=offset, exclude_reference=True
            )
            assert [h.id for h in page.hits] == order[offset : offset + k], (k, offset)
            assert page.more is (offset + k < 11), (k, offset)
            assert page.offset == offset
    shirts = parse_filter('category == "t-shirt"')
    assert sum(m["category"] == "t-shirt" for m in metadata.values()) == 10
    for k, more in ((9, True), (10, False), (11, False)):
        page = composed_search(tiny_model, index, text="a shirt", k=k, filter=shirts)
        assert len(page.hits) == min(k, 10) and page.more is more, k
