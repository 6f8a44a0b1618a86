"""One composed search (retrieval/query.py): pages of results and their exact "more" flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fashion_cir.errors import DataError
from fashion_cir.models.attributes import AttributeHeads, attribute_classes, describe
from fashion_cir.models.cir import load_model
from fashion_cir.retrieval import build_index, parse_filter
from fashion_cir.retrieval.filters import BoolOp, Compare, Filter, FilterError
from fashion_cir.retrieval.query import (
    RequestError,
    SearchRequest,
    attribute_filter,
    composed_search,
    encode_reference_image,
    search,
)
from fashion_cir.retrieval.store import item_vectors
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


def brute_force(model, index, image_features, text, description, keep, exclude=()):
    """Ids in score order by a second implementation: the query built from the model's parts, every
    stored row scored by hand, filtered by a Python predicate."""
    parts = model.encode_queries(image_features, [text], [description], [None])
    query = model.query_vectors(parts).float().numpy()[0]
    ids = [i for i in index.ids if keep(index.metadata[i]) and i not in exclude]
    scores = item_vectors(np.stack([index.vector(i) for i in ids]), index.config) @ query
    return [ids[n] for n in np.argsort(-scores, kind="stable")], parts.texts


def test_composed_search_against_a_brute_force_ranking(small_index, tiny_model):
    index, metadata = small_index
    reference = torch.from_numpy(np.array(index.vector("item-003"), dtype=np.float32)[None])
    expected, texts = brute_force(
        tiny_model, index, reference, "is blue", "a black t-shirt", lambda m: True, exclude={"item-003"}
    )
    result = composed_search(tiny_model, index, item_id="item-003", text="  is blue ", k=4, exclude_reference=True)
    assert metadata["item-003"]["description"] == "a black t-shirt"
    assert [h.id for h in result.hits] == expected[:4] and result.more
    assert result.query_text == texts[0] != "" and result.description == "a black t-shirt"
    assert result.prompt_source == "catalog" and result.reference_attributes == metadata["item-003"]
    assert result.filters == {} and result.offset == 0
    kept = composed_search(tiny_model, index, item_id="item-003", text="is blue", k=3)
    assert [h.id for h in kept.hits] == brute_force(
        tiny_model, index, reference, "is blue", "a black t-shirt", lambda m: True
    )[0][:3]
    # "more like this": no text, the reference alone; same type keeps the reference's category
    similar = composed_search(tiny_model, index, item_id="item-003", k=20, same_type=True, exclude_reference=True)
    expected, _ = brute_force(
        tiny_model, index, reference, "", "a black t-shirt", lambda m: m["category"] == "t-shirt", {"item-003"}
    )
    assert [h.id for h in similar.hits] == expected and similar.query_text == "" and not similar.more
    assert similar.filters == {"category": ["t-shirt"]}
    # an upload: the image encoded through the backbone, no catalog description (the tiny model has no heads)
    photo = Image.open(small_index_paths(index)["item-005"])
    pixels = tiny_model.backbone.preprocess(photo.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        uploaded = tiny_model.backbone.encode_images(pixels).float()
    torch.testing.assert_close(encode_reference_image(tiny_model, photo), uploaded, atol=1e-5, rtol=0)
    expected, _ = brute_force(
        tiny_model, index, uploaded, "is red", None, lambda m: m["color"] in ("red", "blue") and m["category"] != "x"
    )
    upload = composed_search(
        tiny_model, index, image=photo, text="is red", k=30, filters={"color": ["red", "", "blue"], "category": [""]}
    )
    assert [h.id for h in upload.hits] == expected and upload.prompt_source == "none" and upload.description is None
    assert upload.filters == {"color": ["red", "blue"]} and upload.reference_attributes == {}
    text_only = composed_search(tiny_model, index, text="a red dress", k=2, offset=1)
    assert [h.id for h in text_only.hits] == brute_force(tiny_model, index, None, "a red dress", None, bool)[0][1:3]


def small_index_paths(index):
    return {i: index.paths[i] for i in index.ids}


def test_composed_search_refusals(small_index, tiny_model):
    index, _ = small_index
    photo = Image.open(index.paths["item-001"])
    for kwargs, error, message in (
        (
            {"item_id": "item-001", "same_type": True, "filters": {"category": ["", "dress"]}},
            FilterError,
            "same type as the reference cannot be combined with category ['dress']: it keeps only the reference's "
            "own category; choose one of the two",
        ),
        ({"item_id": "item-001", "image": photo}, DataError, "give a reference image or a catalog id, not both"),
        ({"item_id": "nope"}, DataError, "unknown catalog id 'nope'"),
        ({"text": "  "}, DataError, "a query needs a reference (image or catalog id), a text, or both"),
    ):
        with pytest.raises(error) as raised:
            composed_search(tiny_model, index, **kwargs)
        assert str(raised.value) == message
    # same type with blank categories only is fine
    result = composed_search(tiny_model, index, item_id="item-001", same_type=True, filters={"category": [""]}, k=20)
    assert {h.metadata["category"] for h in result.hits} == {index.metadata["item-001"]["category"]}


def test_attribute_filter_combines_the_expression_and_the_attribute_lists():
    assert attribute_filter({}) is None and attribute_filter({"color": []}) is None
    alone = attribute_filter({"color": ["red", "red", "blue"], "category": []})
    assert alone.text == 'color in ["red", "red", "blue"]'
    assert alone.root == Compare("color", False, ("red", "blue"))
    base = parse_filter("kids == false or size == 38")
    both = attribute_filter({"color": ["red"], "category": ["dress", 7]}, base)
    assert both.text == '(kids == false or size == 38) and color in ["red"] and category in ["dress", 7]'
    assert both.root == BoolOp(
        "and", (base.root, Compare("color", False, ("red",)), Compare("category", False, ("dress", "7")))
    )
    assert attribute_filter({}, base) == Filter("(kids == false or size == 38)", base.root)
    records = [{"color": "red", "category": "dress", "kids": False}, {"color": "red", "category": "7", "size": 38}]
    assert [both.matches(r) for r in records] == [True, True]
    assert both.matches({"color": "blue", "category": "dress", "kids": False}) is False


def test_search_request_validation_and_its_run(small_index, tiny_model):
    index, _ = small_index
    for fields, status, message in (
        ({"text_required": True, "item_id": "a"}, 422, "text must not be empty: describe the change"),
        (
            {"text_required": True, "max_text_chars": 5, "text": "  ", "item_id": "a"},
            422,
            "text must not be empty: describe the change in 1 to 5 characters",
        ),
        ({"max_text_chars": 5, "text": " abcdef "}, 422, "text is longer than 5 characters"),
        (
            {"reference_required": True, "text": "x"},
            400,
            "give exactly one reference: an uploaded 'image' file or a catalog 'id'",
        ),
        (
            {"reference_required": True, "text": "x", "image": True, "item_id": "a"},
            400,
            "give exactly one reference: an uploaded 'image' file or a catalog 'id'",
        ),
        ({"image": True, "item_id": "a"}, 400, "give a reference image or a catalog id, not both"),
        ({"text": " "}, 400, "a query needs a reference (image or catalog id), a text, or both"),
    ):
        with pytest.raises(RequestError) as raised:
            SearchRequest(**fields)
        assert (raised.value.status, str(raised.value)) == (status, message), fields
    assert RequestError("x").status == 400
    fine = SearchRequest(text=" abcde ", max_text_chars=5, text_required=True, reference_required=True, item_id="a")
    assert fine.text == "abcde" and fine.query_text == "abcde" and fine.k == 10 and fine.offset == 0
    assert fine.exclude_reference is True and fine.parsed_filter(["color"]) is None
    assert SearchRequest(similar=True, text_required=True, image=True, text="").query_text == ""
    assert SearchRequest(similar=True, text="is red", item_id="a").query_text == ""
    with pytest.raises(FilterError, match="unknown field 'colour'"):
        SearchRequest(text="x", filter='colour == "red"').parsed_filter(["color"])
    assert SearchRequest(text="x", filter=' color == "red" ').parsed_filter(["color"]).matches({"color": "red"})
    for bad in ({"k": 0, "text": "x"}, {"offset": -1, "text": "x"}, {"text": "x", "surprise": 1}):
        with pytest.raises(ValueError):
            SearchRequest(**bad)
    request = SearchRequest(
        item_id="item-002", text="is red", k=3, offset=1, filters={"color": ["red", "blue"]}, exclude_reference=False
    )
    ran = request.run(tiny_model, index, image=Image.open(index.paths["item-009"]))  # image ignored: not asked for
    direct = composed_search(
        tiny_model, index, item_id="item-002", text="is red", k=3, offset=1, filters={"color": ["red", "blue"]}
    )
    assert [h.id for h in ran.hits] == [h.id for h in direct.hits] and ran.offset == 1
    assert ran.filters == {"color": ["red", "blue"]}
    similar = SearchRequest(item_id="item-002", text="is red", similar=True, same_type=True, k=20).run(
        tiny_model, index
    )
    assert similar.query_text == "" and "item-002" not in [h.id for h in similar.hits]
    assert {h.metadata["category"] for h in similar.hits} == {index.metadata["item-002"]["category"]}
    photo = Image.open(index.paths["item-004"])
    uploaded = SearchRequest(image=True, text="is red", k=2).run(tiny_model, index, image=photo)
    assert [h.id for h in uploaded.hits] == [
        h.id for h in composed_search(tiny_model, index, image=photo, text="is red", k=2).hits
    ]
    filtered = SearchRequest(text="a shirt", k=20).run(tiny_model, index, filter=parse_filter('color == "red"'))
    assert {h.metadata["color"] for h in filtered.hits} == {"red"}


def test_search_is_the_first_page_of_composed_search(small_index, tiny_model):
    index, _ = small_index
    red = parse_filter('color == "red" or category == "dress"')
    photo = Image.open(index.paths["item-007"])
    for kwargs in (
        {"item_id": "item-001", "text": "is red", "k": 3, "exclude_reference": True},
        {"item_id": "item-001", "k": 12},
        {"image": photo, "text": "is blue", "k": 5, "filter": red},
        {"text": "a dress", "k": 2},
    ):
        expected = composed_search(tiny_model, index, **kwargs).hits
        assert [(h.id, h.score) for h in search(tiny_model, index, **kwargs)] == [(h.id, h.score) for h in expected]
    assert [h.id for h in search(tiny_model, index, item_id="item-001")] == [
        h.id for h in composed_search(tiny_model, index, item_id="item-001").hits
    ]  # ten by default
    assert "item-001" in [h.id for h in search(tiny_model, index, item_id="item-001", k=12)]
    assert "item-001" not in [h.id for h in search(tiny_model, index, item_id="item-001", k=12, exclude_reference=True)]


def test_defaults_keep_the_reference_and_give_ten(small_index, tiny_model):
    index, _ = small_index
    reference = torch.from_numpy(np.array(index.vector("item-003"), dtype=np.float32)[None])
    result = composed_search(tiny_model, index, item_id="item-003")  # k=10, the reference kept
    expected, _ = brute_force(tiny_model, index, reference, "", "a black t-shirt", lambda m: True)
    assert [h.id for h in result.hits] == expected[:10] and expected[0] == "item-003" and result.more
    photo = Image.open(index.paths["item-005"])
    with torch.no_grad():
        uploaded = encode_reference_image(tiny_model, photo)
    expected, _ = brute_force(tiny_model, index, uploaded, "is red", None, lambda m: True)
    assert [h.id for h in composed_search(tiny_model, index, image=photo, text="is red", k=12).hits] == expected


def test_same_type_for_an_upload_reads_the_predicted_category(small_index):
    """An upload's reference is what the attribute heads predict: its description in the prompt,
    its category for "same type"."""
    index, metadata = small_index
    model = load_model(backbone="tiny")
    classes = attribute_classes()
    heads = AttributeHeads(model.backbone.feature_dim, classes)
    with torch.no_grad():
        for name, head in heads.heads.items():
            head.weight.zero_()
            head.bias.zero_()
            wanted = {"category": "dress", "color": "red"}.get(name)
            head.bias[classes[name].index(wanted) if wanted else 0] = 10.0
    model.attach_heads(heads)
    photo = Image.open(index.paths["item-004"])
    result = composed_search(model, index, image=photo, text="is blue", k=20, same_type=True)
    assert result.prompt_source == "predicted" and result.filters == {"category": ["dress"]}
    assert result.reference_attributes["category"]["value"] == "dress"
    assert result.description == describe(result.reference_attributes) and result.description.startswith("a red")
    dresses = {i for i, m in metadata.items() if m["category"] == "dress"}
    assert {h.id for h in result.hits} == dresses and dresses
    assert result.query_text == model.query_text("is blue", result.description)


def test_search_request_passes_its_categories(small_index, tiny_model):
    index, _ = small_index
    request = SearchRequest(text="a shirt", k=20, filters={"category": ["dress"], "color": []})
    result = request.run(tiny_model, index)
    assert result.filters == {"category": ["dress"]} and {h.metadata["category"] for h in result.hits} == {"dress"}
