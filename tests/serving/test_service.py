"""The search service without HTTP (serving/service.py): the operations the API answers with,
called directly on a real index of drawings and the tiny model, and the same answers over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fashion_cir.retrieval import build_index
from fashion_cir.retrieval.policy import ReferencePolicy
from fashion_cir.retrieval.query import RequestError, composed_search
from fashion_cir.serving.app import search_app
from fashion_cir.serving.service import Limits, SearchService, ServiceError
from support.images import encoded
from support.serving import running_server, synthetic_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return synthetic_catalog(tmp_path_factory.mktemp("service") / "images", 12)


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory, tiny_model, catalog):
    return build_index(tmp_path_factory.mktemp("service") / "index", tiny_model, *catalog, progress=False).folder


@pytest.fixture(scope="module")
def service(index_folder, tiny_model):
    return SearchService.open(index_folder, tiny_model)


def without_time(body: dict) -> dict:
    return {name: value for name, value in body.items() if name != "took_ms"}


def test_search_answers_what_composed_search_finds(service, tiny_model):
    body = service.search(service.request(item_id="item-003", text="  is blue ", k=5))
    expected = composed_search(
        tiny_model, service.index.current(), item_id="item-003", text="is blue", k=5, exclude_reference=True
    )
    assert [r["id"] for r in body["results"]] == [h.id for h in expected.hits]
    np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in expected.hits], atol=1e-5)
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5] and "item-003" not in {
        r["id"] for r in body["results"]
    }
    assert body["text"] == "is blue" and body["query_text"] == expected.query_text == "a black t-shirt, but is blue"
    assert body["reference"] == {
        "id": "item-003",
        "metadata": {"category": "t-shirt", "color": "black", "description": "a black t-shirt"},
        "image_url": "/images/item-003",
    }
    assert body["prompt"] == {"source": "catalog", "description": expected.description}
    assert body["requested"] == {"color": "blue"} and body["more"] is True
    blue = next(r for r in body["results"] if r["metadata"]["color"] == "blue")
    assert blue["match"]


def test_the_http_answer_is_the_service_answer(service):
    with running_server(search_app(service)) as url, httpx.Client(base_url=url, timeout=60) as client:
        form = {"id": "item-007", "text": "is green", "k": "4", "offset": "2", "category": ["t-shirt"]}
        over_http = client.post("/search", data=form).json()
        assert client.get("/items", params={"n": 5, "seed": 4, "q": "RED"}).json() == service.browse(5, 4, "RED")
        assert client.get("/items/item-002").json() == service.item("item-002")
        missing = client.get("/items/nope")
    direct = service.search(
        service.request(item_id="item-007", text="is green", k=4, offset=2, filters={"category": ["t-shirt"]})
    )
    assert without_time(over_http) == without_time(direct)
    assert [r["rank"] for r in direct["results"]] == [3, 4, 5, 6]
    assert all(r["metadata"]["category"] == "t-shirt" for r in direct["results"])
    assert missing.status_code == 404 and missing.json() == {"detail": "unknown item id 'nope'"}


def test_browse_samples_pages_of_matching_items(service, catalog):
    _, metadata = catalog
    everything = service.browse(12, seed=0)
    assert everything["total"] == everything["matched"] == 12
    assert sorted(i["id"] for i in everything["items"]) == sorted(metadata)
    assert service.browse(5, seed=3) == service.browse(5, seed=3) != service.browse(5, seed=4)
    red = service.browse(12, words="Red T-SHIRT")
    assert red["matched"] == 1 and [i["id"] for i in red["items"]] == ["item-000"]
    assert red["items"][0] == {"id": "item-000", "metadata": metadata["item-000"], "image_url": "/images/item-000"}
    assert service.browse(12, words="purple")["items"] == []


def test_unknown_and_malformed_ids_are_404s(service):
    with pytest.raises(ServiceError, match=r"^unknown item id 'nope'$") as refused:
        service.search(service.request(item_id="nope", text="is red"))
    assert refused.value.status == 404
    with pytest.raises(ServiceError, match=r"unknown item id '\.\./x' \(an id is a file name without folders\)"):
        service.item("../x")
    assert service.image_file("item-004").name == "item-004.jpg"


def test_requests_follow_the_service_rules(service):
    with pytest.raises(RequestError, match="give exactly one reference") as refused:
        service.request(text="is red")
    assert refused.value.status == 400
    with pytest.raises(RequestError, match="text must not be empty: describe the change in 1 to 300 characters"):
        service.request(item_id="item-001")
    with pytest.raises(RequestError, match="k is 101: at most 100 results are served at once") as refused:
        service.request(item_id="item-001", text="is red", k=101)
    assert refused.value.status == 422 and service.request(item_id="item-001", text="is red", k=100).k == 100
    similar = service.search(service.request(item_id="item-001", similar=True, k=3))
    assert similar["text"] == similar["query_text"] == "" and len(similar["results"]) == 3


def test_uploads_are_checked_decoded_and_searched(service, catalog, index_folder, tiny_model):
    paths, _ = catalog
    request = service.request(image=True, text="is red", k=3)
    body = service.search(request, paths["item-005"].read_bytes(), "photo.jpg")
    assert body["reference"] == {"id": None, "upload": "photo.jpg"} and len(body["results"]) == 3
    for raw, status, words in (
        (b"", 400, "uploaded image is empty"),
        (b"not an image", 415, "JPEG, PNG or WebP"),
        (encoded(Image.new("RGB", (640, 40), (9, 9, 9)), "PNG"), 422, "more elongated than 8:1"),
    ):
        with pytest.raises(ServiceError, match=words) as refused:
            service.search(request, raw, "x")
        assert refused.value.status == status
    small = SearchService.open(index_folder, tiny_model, limits=Limits(max_upload_bytes=100), upload_queue=0)
    with pytest.raises(ServiceError, match="larger than the limit of 0.0 MB") as refused:
        small.search(request, paths["item-005"].read_bytes(), "photo.jpg")
    assert refused.value.status == 413
    assert small.limits.max_pixels == (64 * 16) ** 2  # sized to the tiny model's 64 px input


def test_a_full_upload_pool_is_503_with_retry_after(index_folder, tiny_model, catalog):
    paths, _ = catalog
    service = SearchService.open(index_folder, tiny_model, upload_workers=1, upload_queue=0)
    request = service.request(image=True, text="is red")
    with service.uploads.slot():
        with pytest.raises(ServiceError, match="too many uploads are being processed") as refused:
            service.search(request, paths["item-005"].read_bytes(), "photo.jpg")
        assert service.search(service.request(item_id="item-001", text="is red"))["results"]  # ids are not queued
    assert refused.value.status == 503 and refused.value.retry_after == 1
    assert service.search(request, paths["item-005"].read_bytes(), "photo.jpg")["results"]


def test_the_reference_policy_is_the_services(index_folder, tiny_model, service):
    silent = SearchService.open(index_folder, tiny_model, policy=ReferencePolicy("none"))
    body = silent.search(silent.request(item_id="item-003", text="is blue", k=3))
    assert body["prompt"] == {"source": "none", "description": None} and body["query_text"] == "is blue"
    assert service.search(service.request(item_id="item-003", text="is blue", k=3))["prompt"]["source"] == "catalog"


def test_status_and_public_messages(service, index_folder):
    status = service.status()
    assert status["status"] == "ok" and status["items"] == 12 and status["backbone"] == "tiny:0"
    assert status["store"] == "faiss" and status["filter_fields"] == ["category", "color", "description"]
    assert status["text_engine"] == "pytorch"  # the tiny model has no description matcher
    assert service.public(f"cannot read {index_folder}/index.json or /etc/hosts") == (
        "cannot read <index>/index.json or <path>"
    )


def test_a_matcher_is_served_through_onnx_runtime_with_pytorchs_answers(tmp_path, monkeypatch):
    """Issue 23: the service encodes a search's texts with ONNX Runtime (status says so) and answers
    what PyTorch finds; a catalog reference's description is read from its stored row, not encoded
    again, so a search encodes only its caption with the matcher."""
    from fashion_cir.retrieval.folder import open_index
    from fashion_cir.retrieval.store import item_vectors
    from support.matcher import multi_block_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = multi_block_model(tmp_path / "tiny-bert")
    paths, metadata = synthetic_catalog(tmp_path / "images", 20)
    folder = build_index(
        tmp_path / "index", model, paths, metadata, progress=False, cache_dir=tmp_path / "cache"
    ).folder
    queries = [("item-003", "is red"), ("item-011", "same but in blue"), ("item-016", "is a longer skirt")]
    index = open_index(folder, model)
    expected = [composed_search(model, index, item_id=i, text=t, k=8, exclude_reference=True).hits for i, t in queries]
    service = SearchService.open(folder, model)
    assert service.status()["text_engine"] == "onnxruntime"
    assert (
        len(list((tmp_path / "xdg" / "fashion-cir" / "onnx").glob("text-*.onnx"))) == 1
    )  # untrained: both sides' weights
    encoded: list[list[str]] = []
    embed = model.matcher.embed
    monkeypatch.setattr(
        model.matcher, "embed", lambda texts, *a, **k: encoded.append(list(texts)) or embed(texts, *a, **k)
    )
    monkeypatch.setattr("fashion_cir.models.matcher.mean_pool", lambda *a: pytest.fail("PyTorch ran the matcher"))
    for (item_id, text), hits in zip(queries, expected):
        body = service.search(service.request(item_id=item_id, text=text, k=8))
        assert [r["id"] for r in body["results"]] == [h.id for h in hits]
        np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in hits], atol=1e-5)
    assert encoded == [[text] for _, text in queries]
    # by hand: the reference description encoded afresh (float32; the stored rows hold float16)
    ids = list(index.ids)
    items = item_vectors(index.stored_rows(ids), index.config)
    dim = int(index.config["feature_dim"])
    monkeypatch.undo()
    for (item_id, text), hits in zip(queries, expected):
        record = metadata[item_id]
        image = torch.from_numpy(index.stored_rows([item_id])[:, :dim])
        parts = model.encode_queries(image, [text], [record["description"]], [record])
        scores = dict(zip(ids, items @ model.query_vectors(parts)[0].numpy()))
        del scores[item_id]
        assert all(abs(scores[h.id] - h.score) < 2e-3 for h in hits)
        assert sorted(scores.values())[-8] <= hits[-1].score + 2e-3
    # int8 queries (app and command line: --int8-queries): the service says so and still answers
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    int8 = SearchService.open(folder, model, int8_queries=True)
    assert int8.status()["text_engine"] == "onnxruntime-int8"
    assert len(list((tmp_path / "xdg" / "fashion-cir" / "onnx").glob("text-*.int8.onnx"))) == 1
    assert len(int8.search(int8.request(item_id="item-003", text="is red", k=8))["results"]) == 8


def test_the_service_imports_no_web_framework():
    """FastAPI, Starlette and uvicorn are optional: the service (and the CLI) import without them."""
    src = Path(__file__).resolve().parents[2] / "src"
    code = (
        "import sys, fashion_cir.serving.service, fashion_cir.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', 'uvicorn'}))"
    )
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
