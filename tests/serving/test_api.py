"""The search API against a real uvicorn server on 127.0.0.1: success paths and bad inputs, each
answered with a clear JSON ``{"detail": ...}`` and the right 4xx status. Hardening on a small
catalog of drawings: decoder allow-list, an upload pixel limit sized to the model, a bounded
decode+encode pool (503 + Retry-After), logged JSON 500s that close the connection, /images
confined to the catalog root, security headers, one index version per search and the last good
one when a new manifest is bad, ids and filters that are never expression text (FAISS and Milvus)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fashion_cir.data.images import upload_pixel_limit
from fashion_cir.models.cir import CIRModel, load_model
from fashion_cir.retrieval import build_index, parse_filter, remove_from_index
from fashion_cir.serving.app import create_app
from fashion_cir.serving.service import MB
from support.images import encoded
from support.serving import demo_catalog, running_server, synthetic_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return demo_catalog(tmp_path_factory.mktemp("catalog"), 40)


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory, tiny_model, catalog):
    folder = tmp_path_factory.mktemp("api") / "index"
    build_index(folder, tiny_model, *catalog, progress=False)
    return folder


@pytest.fixture(scope="module")
def base_url(index_folder, tiny_model):
    with running_server(create_app(index_folder, tiny_model)) as url:
        yield url


@pytest.fixture(scope="module")
def catalog_features(tiny_model, catalog):
    """Raw image features of every catalog item, encoded here straight from the files (no cache, no index)."""
    paths, _ = catalog
    backbone = tiny_model.backbone
    with torch.no_grad():
        pixels = torch.stack([backbone.preprocess(Image.open(p).convert("RGB")) for p in paths.values()])
        return list(paths), backbone.encode_images(pixels).numpy().astype(np.float64)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def assert_ranked_by(results: list[dict], ids: list[str], scores: np.ndarray, tolerance: float = 5e-3) -> None:
    """``results`` are the top of ``scores`` (over ``ids``), best first, with matching scores; the
    tolerance covers the fp16 feature cache, so near-ties may swap but nothing else."""
    by_id = dict(zip(ids, scores))
    got = [r["id"] for r in results]
    assert len(got) == len(set(got))
    np.testing.assert_allclose([r["score"] for r in results], [by_id[i] for i in got], atol=tolerance)
    best_left_out = max((s for i, s in by_id.items() if i not in got), default=-np.inf)
    assert min(by_id[i] for i in got) >= best_left_out - tolerance
    assert all(by_id[a] >= by_id[b] - tolerance for a, b in zip(got, got[1:]))


@pytest.fixture()
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    for word in words:
        assert word in detail, detail


def first_id(catalog) -> str:
    return next(iter(catalog[0]))


def test_health_items_and_images(client, catalog):
    paths, metadata = catalog
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == 40 and health["backbone"] == "tiny:0"
    sample = client.get("/items", params={"n": 12, "seed": 3}).json()
    assert sample["total"] == 40 and len(sample["items"]) == 12
    assert sample == client.get("/items", params={"n": 12, "seed": 3}).json()
    image_id = first_id(catalog)
    item = client.get(f"/items/{image_id}").json()
    assert item["metadata"] == metadata[image_id] and item["image_url"] == f"/images/{image_id}"
    response = client.get(item["image_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == paths[image_id].read_bytes()
    word = metadata[image_id]["description"].split()[-1]
    filtered = client.get("/items", params={"q": word, "n": 200}).json()
    assert 1 <= filtered["matched"] <= 40 and image_id in {i["id"] for i in filtered["items"]}


def test_search_by_catalog_id(client, catalog):
    image_id = first_id(catalog)
    body = client.post("/search", data={"id": image_id, "text": "  is red with long sleeves ", "k": 5}).json()
    assert body["text"] == "is red with long sleeves" and body["k"] == 5
    assert body["query_text"].endswith("but is red with long sleeves")
    assert body["reference"]["id"] == image_id
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert all(r["image_url"] == f"/images/{r['id']}" and "metadata" in r for r in results)
    # the reference is not its own answer: asked for the whole catalog, every other item comes back
    everything = client.post("/search", data={"id": image_id, "text": "is red with long sleeves", "k": 100}).json()
    assert len(everything["results"]) == 39 and image_id not in {r["id"] for r in everything["results"]}


def test_image_mode_upload_of_a_catalog_image_finds_that_item_first(tiny_model, index_folder, catalog):
    """A model in `image` mode ignores the text: the upload of a catalog photo is that item (score 1),
    while a catalog id as reference is left out of its own results."""
    image_mode = CIRModel(tiny_model.backbone, "image").eval()
    paths, _ = catalog
    with running_server(create_app(index_folder, image_mode)) as url, httpx.Client(base_url=url, timeout=30) as http:
        for image_id in list(paths)[:3]:
            files = {"image": ("ref.jpg", paths[image_id].read_bytes(), "image/jpeg")}
            first = http.post("/search", data={"text": "is red", "k": 5}, files=files).json()["results"][0]
            assert first["id"] == image_id and first["score"] == pytest.approx(1.0, abs=5e-3)
            by_id = http.post("/search", data={"id": image_id, "text": "is red", "k": 5}).json()["results"]
            assert image_id not in {r["id"] for r in by_id}


def test_upload_search_ranks_by_the_composed_query(client, tiny_model, catalog, catalog_features):
    """The ranking of an uploaded reference + text is the catalog sorted by cosine with
    normalise(normalise(image) + normalise(text)), recomputed here; another text gives another ranking."""
    paths, _ = catalog
    ids, gallery = catalog_features
    image_id = ids[7]
    reference = gallery[ids.index(image_id)]
    rankings = []
    for text in ("is darker", "has long sleeves and a floral print"):
        files = {"image": ("ref.jpg", paths[image_id].read_bytes(), "image/jpeg")}
        body = client.post("/search", data={"text": text, "k": 10}, files=files).json()
        assert body["query_text"] == text  # an upload has no description to prefix
        text_features = tiny_model.backbone.embed_texts([text]).numpy()[0].astype(np.float64)
        query = _unit(_unit(reference) + _unit(text_features))
        assert_ranked_by(body["results"], ids, _unit(gallery) @ query)
        rankings.append([r["id"] for r in body["results"]])
    assert rankings[0] != rankings[1]


def test_search_by_upload(client, catalog):
    paths, _ = catalog
    image_id = first_id(catalog)
    files = {"image": ("ref.jpg", paths[image_id].read_bytes(), "image/jpeg")}
    body = client.post("/search", data={"text": "is darker", "k": 100}, files=files).json()
    assert body["reference"] == {"id": None, "upload": "ref.jpg"} and body["query_text"] == "is darker"
    assert len(body["results"]) == 40  # k is capped by the catalog size
    png = io.BytesIO()
    Image.open(paths[image_id]).save(png, "PNG")
    response = client.post(
        "/search", data={"text": "is blue"}, files={"image": ("ref.png", png.getvalue(), "image/png")}
    )
    assert response.status_code == 200 and len(response.json()["results"]) == 10


def test_docs_and_page(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/search", "/items/{item_id}", "/images/{item_id}", "/health"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "Describe the change" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_bad_uploads(client, catalog):
    paths, _ = catalog
    jpeg = paths[first_id(catalog)].read_bytes()
    assert_error(
        client.post("/search", data={"text": "x"}, files={"image": ("a.jpg", b"not an image at all", "image/jpeg")}),
        415,
        "not an image",
    )
    assert_error(
        client.post("/search", data={"text": "x"}, files={"image": ("a.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}),
        400,
        "corrupt or truncated",
    )
    bomb = png_claiming(20000, 20000)
    assert len(bomb) < 200
    start = time.perf_counter()
    assert_error(
        client.post("/search", data={"text": "x"}, files={"image": ("bomb.png", bomb, "image/png")}),
        413,
        "too many pixels",
    )
    assert time.perf_counter() - start < 2  # rejected from the header, never decoded
    assert_error(
        client.post("/search", data={"text": "x"}, files={"image": ("big.png", png_claiming(8000, 8000), "image/png")}),
        413,
        "8000x8000",
    )
    assert_error(
        client.post("/search", data={"text": "x"}, files={"image": ("empty.jpg", b"", "image/jpeg")}),
        400,
        "uploaded image is empty",
    )


def test_oversized_bodies(client):
    eleven_mb = b"\xff" * (11 << 20)
    assert_error(
        client.post("/search", data={"text": "x"}, files={"image": ("big.jpg", eleven_mb, "image/jpeg")}),
        413,
        "limited to 10 MB",
    )

    def chunks():  # no Content-Length: the server must count the bytes itself
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
        for _ in range(12):
            yield b"\0" * (1 << 20)

    response = client.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(response, 413, "limited to 10 MB")


def jpeg_of_size(jpeg: bytes, size: int) -> bytes:
    """``jpeg`` grown to exactly ``size`` bytes by comment segments after its start marker, so the
    whole file is one valid JPEG and cutting any of its end off truncates the picture."""
    pad, segments = size - len(jpeg), []
    assert pad >= 4
    while pad:
        take = min(pad, 65537)  # marker (2) + length (2) + at most 65533 bytes of comment
        if 0 < pad - take < 4:
            take -= 4
        segments.append(b"\xff\xfe" + struct.pack(">H", take - 2) + b"x" * (take - 4))
        pad -= take
    grown = jpeg[:2] + b"".join(segments) + jpeg[2:]
    assert len(grown) == size
    return grown


def test_uploads_at_the_size_limit(client, catalog):
    """Issue 24 item 10: an upload of exactly the limit is searched; one byte or 2 KB over it is
    refused with 413 (under the body limit's room for form fields, so the endpoint's own check
    answers), not read up to the limit and answered 400 as a truncated picture."""
    limit = client.get("/health").json()["limits"]["max_upload_bytes"]
    assert limit == 10 << 20
    jpeg = catalog[0][first_id(catalog)].read_bytes()
    response = client.post(
        "/search",
        data={"text": "is darker", "k": 3},
        files={"image": ("ref.jpg", jpeg_of_size(jpeg, limit), "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3
    for over in (1, 2048):
        response = client.post(
            "/search",
            data={"text": "is darker"},
            files={"image": ("ref.jpg", jpeg_of_size(jpeg, limit + over), "image/jpeg")},
        )
        assert_error(response, 413, "uploaded image is larger than the limit of 10.0 MB")


@pytest.mark.parametrize(
    "form, status, words",
    [
        ({"text": ""}, 422, ["text must not be empty"]),
        ({"text": "   "}, 422, ["text must not be empty"]),
        ({"text": "x" * 301}, 422, ["text", "300"]),
        ({"text": "x", "k": 0}, 422, ["k", "greater than or equal to 1"]),
        ({"text": "x", "k": 10**6}, 422, ["k", "less than or equal to 100"]),
        ({"text": "x", "k": "ten"}, 422, ["k", "integer"]),
        ({"text": "x", "id": "no-such-item"}, 404, ["unknown item id 'no-such-item'"]),
        ({"text": "x", "id": "../../etc/passwd"}, 404, ["unknown item id"]),
        ({"text": "x"}, 400, ["exactly one reference"]),
    ],
)
def test_bad_search_fields(client, catalog, form, status, words):
    form = {"id": first_id(catalog), **form} if status == 422 else form
    assert_error(client.post("/search", data=form), status, *words)


def test_both_references_refused(client, catalog):
    paths, _ = catalog
    image_id = first_id(catalog)
    response = client.post(
        "/search",
        data={"text": "x", "id": image_id},
        files={"image": ("a.jpg", paths[image_id].read_bytes(), "image/jpeg")},
    )
    assert_error(response, 400, "exactly one reference")


@pytest.mark.parametrize(
    "path",
    [
        "/images/..%2F..%2Fetc%2Fpasswd",
        "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/items/..%2F..%2Fetc%2Fpasswd",
        "/images/%2Fetc%2Fpasswd",
        "/images/no-such-item",
        "/items/no-such-item",
    ],
)
def test_unknown_and_traversal_ids(client, path):
    response = client.get(path)
    assert_error(response, 404, "unknown item id")
    assert b"root:" not in response.content


def test_bad_browse_parameters(client):
    assert_error(client.get("/items", params={"n": 0}), 422, "n")
    assert_error(client.get("/items", params={"n": 1000}), 422, "n")
    assert_error(client.get("/nowhere"), 404)


# -- hardening (issues 12 and 22) on a small catalog of drawings --
@pytest.fixture(scope="module")
def drawings_index(tmp_path_factory, tiny_model):
    paths, metadata = synthetic_catalog(tmp_path_factory.mktemp("catalog") / "images", 12)
    return build_index(tmp_path_factory.mktemp("api") / "index", tiny_model, paths, metadata, progress=False).folder


@pytest.fixture()
def served(drawings_index):
    """A fresh tiny model (tests patch it) served with one upload worker and no queue."""
    model = load_model(backbone="tiny")
    app = create_app(drawings_index, model, upload_workers=1, upload_queue=0)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, model, app


def upload(client: httpx.Client, data: bytes, name: str = "photo.jpg", mime: str = "image/jpeg") -> httpx.Response:
    return client.post("/search", data={"text": "is red"}, files={"image": (name, data, mime)})


def test_other_formats_are_415(served):
    """Issue 12 item 1: TIFF, BMP and EPS uploads were decoded (EPS by running Ghostscript)."""
    client, _, _ = served
    for fmt in ("TIFF", "BMP", "EPS"):
        response = upload(client, encoded(Image.new("RGB", (64, 64), (9, 9, 200)), fmt), f"a.{fmt.lower()}")
        assert response.status_code == 415, (fmt, response.text)
        assert "JPEG, PNG or WebP" in response.json()["detail"]


def test_the_pixel_limit_is_sized_to_the_model_and_jpegs_decode_reduced(served):
    """Issue 12 item 2: the limit was 40 megapixels whatever the model (a 35 KB PNG decoded to ~265 MB)."""
    client, _, _ = served
    limit = client.get("/health").json()["limits"]["max_pixels"]
    assert limit == (64 * 16) ** 2  # the tiny model's 64 px input, 16x on each side
    png = encoded(Image.new("RGB", (1100, 1000), (200, 30, 30)), "PNG")
    response = upload(client, png, "big.png", "image/png")
    assert response.status_code == 413 and "1100x1000" in response.json()["detail"]
    photo = encoded(Image.new("RGB", (3000, 2000), (200, 30, 30)), "JPEG")  # 6 MP, decoded at 1/8 scale
    response = upload(client, photo)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 10


def test_uploads_beyond_the_pool_get_503_with_retry_after(served):
    """Issue 12 item 2: nothing bounded how many uploads decode and encode at once."""
    client, model, _ = served
    inside, release = threading.Event(), threading.Event()
    encode = model.backbone.encode_images

    def slow(pixels):
        inside.set()
        release.wait(60)
        return encode(pixels)

    model.backbone.encode_images = slow
    photo = encoded(Image.new("RGB", (80, 100), (200, 30, 30)), "JPEG")
    first: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: first.append(upload(client, photo)))
    worker.start()
    try:
        assert inside.wait(60)
        busy = upload(client, photo)
        by_id = client.post("/search", data={"text": "is red", "id": "item-001"})  # id searches are not queued
    finally:
        release.set()
        worker.join(60)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.headers["content-type"].startswith("application/json") and "retry" in busy.json()["detail"]
    assert by_id.status_code == 200 and first[0].status_code == 200


def test_unexpected_errors_are_logged_json_500s(served, caplog):
    """Issue 12 item 6: 500s were text/plain and no handler logged them."""
    client, model, _ = served

    def broken(texts, *args, **options):
        raise RuntimeError("tokenizer exploded")

    model.backbone.embed_texts = broken
    with caplog.at_level(logging.ERROR, logger="fashion_cir.serving.app"):
        response = client.post("/search", data={"text": "is red", "id": "item-001"})
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    assert "internal error (RuntimeError)" in response.json()["detail"]
    assert "tokenizer exploded" not in response.text  # details stay in the log
    records = [r for r in caplog.records if r.name == "fashion_cir.serving.app"]
    assert records and records[0].exc_info and "POST /search" in records[0].getMessage()


def test_images_are_served_only_from_inside_the_catalog(served, tmp_path):
    """Issue 12 item 7: /images served whatever path the index held, /etc/passwd included."""
    client, _, app = served
    assert client.get("/images/item-002").status_code == 200
    index = app.state.index
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"\xff\xd8 not in the catalog")
    for path in (Path("/etc/passwd"), outside, Path(index.config["root"]) / ".." / "x.jpg"):
        index.paths["item-002"] = path
        response = client.get("/images/item-002")
        assert response.status_code == 404 and "inside the catalog" in response.json()["detail"], path


def png_of(width: int, height: int) -> bytes:
    return encoded(Image.new("RGB", (width, height), (200, 30, 30)), "PNG")


def test_thin_uploads_are_422_before_any_resize(served):
    """Issue 22 item 1: a 100000x1 PNG passed the pixel limit; the model's resize of its short side
    took seconds and gigabytes per request (1048576x1, inside the limit, would need ~20 GB)."""
    client, _, _ = served
    for width, height in ((20_000, 1), (1, 100_000), (1_048_576, 1), (513, 64)):
        response = upload(client, png_of(width, height), "thin.png", "image/png")
        assert response.status_code == 422, (width, height, response.text)
        assert response.json()["detail"] == (
            f"uploaded image: image is {width}x{height} pixels, more elongated than "
            "8:1 (long side over short side); crop it"
        )
    assert upload(client, png_of(512, 64), "wide.png", "image/png").status_code == 200


def raw_exchange(base_url: str, request: bytes) -> bytes:
    """Send one raw HTTP/1.1 request on a new connection and read until the server closes it."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_500_says_connection_close_and_the_client_carries_on(served, caplog):
    """Issue 22 item 4: after a 500 the server reset the keep-alive connection without
    ``Connection: close``, so the client's next request on it failed."""
    client, model, _ = served

    def broken(texts, *args, **options):
        raise RuntimeError("tokenizer exploded")

    embed = model.backbone.embed_texts
    model.backbone.embed_texts = broken
    body = b"text=is+red&id=item-001"
    request = (
        b"POST /search HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with caplog.at_level(logging.ERROR):
        answer = raw_exchange(str(client.base_url), request)
        assert client.post("/search", data={"text": "is red", "id": "item-001"}).status_code == 500
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500") and b"connection: close" in head.lower(), head
    assert json.loads(payload)["detail"] == "internal error (RuntimeError); the server log has the details"
    model.backbone.embed_texts = embed
    assert client.get("/health").status_code == 200  # the same client, on a new connection
    assert client.post("/search", data={"text": "is red", "id": "item-001"}).status_code == 200
    logged = [r for r in caplog.records if r.exc_info]
    assert [r.name for r in logged] == ["fashion_cir.serving.app"] * 2  # ours, once per request; none from uvicorn


def test_security_headers_on_every_answer(served):
    """Issue 22 item 10: no X-Content-Type-Options, X-Frame-Options/frame-ancestors or CSP on the page."""
    client, _, _ = served
    answers = [
        client.get("/"),
        client.get("/static/app.js"),
        client.get("/health"),
        client.get("/items/nope"),
        client.get("/images/item-002"),
        upload(client, b"not an image"),
        client.get("/docs"),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 404, 200, 415, 200]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.url
        assert answer.headers["x-frame-options"] == "DENY", answer.url
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], answer.url
    policy = answers[0].headers["content-security-policy"]
    assert "default-src 'self'" in policy and "img-src 'self' blob: data:" in policy and "object-src 'none'" in policy
    assert answers[-1].headers["content-security-policy"] == "frame-ancestors 'none'"  # Swagger UI loads from a CDN


def test_a_search_answers_from_one_index_version(tmp_path, tiny_model):
    """Issue 22 item 7: during `index remove`, a response had 9 removed items with metadata {}
    (results from the old index, metadata from the new one)."""
    paths, metadata = synthetic_catalog(tmp_path / "images", 12)
    folder = build_index(tmp_path / "index", tiny_model, paths, metadata, progress=False).folder
    model = load_model(backbone="tiny")
    embed, removed = model.backbone.embed_texts, []

    def remove_midway(texts, *args, **options):  # the catalog changes while the search runs
        if not removed:
            removed.extend(remove_from_index(folder, list(paths)[:9])[1])
        return embed(texts, *args, **options)

    model.backbone.embed_texts = remove_midway
    with running_server(create_app(folder, model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = client.post("/search", data={"id": "item-011", "text": "is red", "k": 12}).json()
        assert len(removed) == 9 and len(body["results"]) == 11  # the version the search started on
        assert [r["metadata"] for r in body["results"]] == [metadata[r["id"]] for r in body["results"]]
        assert body["reference"]["metadata"] == metadata["item-011"]
        assert client.get("/health").json()["items"] == 3  # the next request sees the new version


@pytest.fixture(scope="module")
def milvus_served(tmp_path_factory, tiny_model):
    """40 drawings (4 red ones) in a milvus-lite index, served."""
    root = tmp_path_factory.mktemp("milvus")
    paths, metadata = synthetic_catalog(root / "images", 40)
    store = f"milvus:{root / 'm.db'}"
    folder = build_index(root / "index", tiny_model, paths, metadata, store=store, progress=False).folder
    app = create_app(folder, tiny_model)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, app, metadata


def test_browsing_a_milvus_catalog_reads_it_once(milvus_served):
    """Issue 22 item 5: GET /items?q=red made one Milvus query per item (0.8 s against 0.03 s on
    FAISS at 304 items), and the page asks on every keystroke."""
    client, app, metadata = milvus_served
    milvus, calls = app.state.index.current().client, []

    def counted(name: str):
        method = getattr(milvus, name)
        return lambda *args, **options: calls.append(name) or method(*args, **options)

    for name in ("query", "query_iterator", "get", "search"):
        setattr(milvus, name, counted(name))
    try:
        red = client.get("/items", params={"q": "RED", "n": 200}).json()
        sample = client.get("/items", params={"n": 5, "seed": 2}).json()
    finally:
        for name in ("query", "query_iterator", "get", "search"):
            delattr(milvus, name)
    assert calls == ["query_iterator", "query_iterator"]  # one scan per request, whatever the catalog size
    assert red["total"] == 40 and red["matched"] == 4
    assert sorted((i["id"], i["metadata"]["color"]) for i in red["items"]) == sorted(
        (i, "red") for i, m in metadata.items() if m["color"] == "red"
    )
    assert len(sample["items"]) == 5 and all(i["metadata"] == metadata[i["id"]] for i in sample["items"])


def test_a_three_block_milvus_index_serves_what_faiss_finds(tmp_path_factory):
    """Issue 23 item 1: a model that reads descriptions and attributes could not be indexed on
    Milvus. Its manifest (with blocks) reopens in the service, and /search answers with the ids and
    scores a FAISS index of the same model finds (filters, categories and the reference left out)."""
    from fashion_cir.retrieval.folder import open_index
    from fashion_cir.retrieval.query import composed_search
    from support.matcher import multi_block_model

    root = tmp_path_factory.mktemp("milvus-blocks")
    model = multi_block_model(root / "tiny-bert")
    paths, metadata = synthetic_catalog(root / "images", 40)
    options = {"progress": False, "cache_dir": root / "cache"}
    folder = build_index(root / "milvus", model, paths, metadata, store=f"milvus:{root / 'm.db'}", **options).folder
    faiss_index = open_index(build_index(root / "faiss", model, paths, metadata, **options).folder, model)
    with running_server(create_app(folder, model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").json()["items"] == 40
        for form, expression, categories in (
            ({"id": "item-003", "text": "is red"}, "", []),
            ({"id": "item-011", "text": "is a blue skirt"}, 'color != "black"', []),
            ({"id": "item-020", "text": "is green", "category": ["dress", "hat"]}, "", ["dress", "hat"]),
        ):
            body = client.post("/search", data={**form, "k": 8, "filter": expression}).json()
            expected = composed_search(
                model,
                faiss_index,
                item_id=form["id"],
                text=form["text"],
                k=8,
                exclude_reference=True,
                filters={"category": categories},
                filter=parse_filter(expression, faiss_index.fields) if expression else None,
            ).hits
            assert [r["id"] for r in body["results"]] == [h.id for h in expected], form
            np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in expected], atol=2e-5)


def test_a_two_stage_memory_mapped_int8_index_serves_exact_scores(tmp_path, tiny_model):
    """Issue 23 items 3-4: an int8 (SQ8) index built with candidates and mmap is served memory-mapped,
    and /search re-scores its candidates: the ids and scores an exact Flat index finds."""
    from fashion_cir.retrieval.folder import open_index
    from fashion_cir.retrieval.query import composed_search

    paths, metadata = synthetic_catalog(tmp_path / "images", 40)
    options = {"progress": False, "cache_dir": tmp_path / "cache"}
    two_stage = build_index(
        tmp_path / "sq8", tiny_model, paths, metadata, factory="SQ8", candidates=20, mmap=True, **options
    )
    exact = open_index(build_index(tmp_path / "flat", tiny_model, paths, metadata, **options).folder, tiny_model)
    with (
        running_server(create_app(two_stage.folder, tiny_model)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        health = client.get("/health").json()
        assert (health["factory"], health["candidates"], health["mmap"]) == ("SQ8", 20, True)
        for form in (
            {"id": "item-003", "text": "is red"},
            {"id": "item-011", "text": "is blue", "filter": 'color != "red"'},
        ):
            body = client.post("/search", data={**form, "k": 8}).json()
            expected = composed_search(
                tiny_model,
                exact,
                item_id=form["id"],
                text=form["text"],
                k=8,
                exclude_reference=True,
                filter=parse_filter(form["filter"], exact.fields) if "filter" in form else None,
            ).hits
            assert [r["id"] for r in body["results"]] == [h.id for h in expected], form
            np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in expected], atol=2e-5)
        # a page beyond the index's 20 candidates: the candidate set grows to cover it
        body = client.post("/search", data={"id": "item-003", "text": "is red", "k": 30}).json()
        expected = composed_search(tiny_model, exact, item_id="item-003", text="is red", k=30, exclude_reference=True)
        assert [r["id"] for r in body["results"]] == [h.id for h in expected.hits]


INJECTED_IDS = ["x'] or id not in ['", "x'] or path like '/%' and id not in ['", "x'", 'x"', "item-001' or 'a'=='a"]


@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_ids_from_the_api_are_never_expression_text(store, request):
    """Issue 22 item 2: GET /items/x'%5D%20or%20id%20not%20in%20%5B' returned another item and its
    photo, path probes answered 200 vs 404, and x' or x\\ were 500s."""
    client = request.getfixturevalue("milvus_served" if store == "milvus" else "served")[0]
    for item_id in INJECTED_IDS:
        quoted = quote(item_id, safe="")
        for response in (
            client.get(f"/items/{quoted}"),
            client.get(f"/images/{quoted}"),
            client.post("/search", data={"id": item_id, "text": "is red"}),
        ):
            assert response.status_code == 404, (item_id, response.text)
            assert response.json()["detail"].startswith(f"unknown item id {item_id!r}")  # '/' adds the reason
    for item_id, problem in (
        ("x\\", "an id is a file name without folders"),
        ("a\x08b", "an id has no control characters"),
    ):
        response = client.get(f"/items/{quote(item_id, safe='')}")
        assert response.status_code == 404 and response.json()["detail"] == f"unknown item id {item_id!r} ({problem})"
    assert client.get("/items/item-001").status_code == 200


def test_same_type_and_an_explicit_category_are_refused_together(served):
    """Issue 22 item 8: same_type=true silently replaced an explicit category (asked dress, got
    {"category": ["shirt"]})."""
    client, _, _ = served
    form = {"id": "item-001", "text": "is red", "k": "12"}
    response = client.post("/search", data={**form, "same_type": "true", "category": ["dress", "pants"]})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "same type as the reference cannot be combined with category "
        "['dress', 'pants']: it keeps only the reference's own category; "
        "choose one of the two"
    )
    for extra, category in (({"same_type": "true"}, "t-shirt"), ({"category": "dress"}, "dress")):
        body = client.post("/search", data={**form, **extra}).json()
        assert body["filters"] == {"category": [category]}
        assert {r["metadata"]["category"] for r in body["results"]} == {category}


def swap_manifest(folder: Path, text: str) -> None:
    """Replace index.json the way a writer does (a new file renamed over it)."""
    (folder / "index.json.new").write_text(text)
    os.replace(folder / "index.json.new", folder / "index.json")


def test_a_bad_new_manifest_leaves_the_last_good_index_serving(tmp_path, tiny_model, caplog):
    """Issue 22 item 6: a broken index.json swapped into a served folder made every endpoint,
    /health included, answer 400 with server paths in the message (deeply nested JSON: 500)."""
    paths, metadata = synthetic_catalog(tmp_path / "images", 12)
    folder = build_index(tmp_path / "index", tiny_model, paths, metadata, progress=False).folder
    good = (folder / "index.json").read_text()
    broken = {
        "not JSON": "{",
        "nested": "[" * 100_000 + "]" * 100_000,
        "bad field": json.dumps({**json.loads(good), "nprobe": -1}),
        "another store": good.replace('"faiss"', '"pinecone"'),
    }
    reasons = {
        "not JSON": "malformed index manifest <index>/index.json: Expecting property name enclosed in double",
        "nested": "malformed index manifest <index>/index.json: nested too deeply",
        "bad field": "count, feature_dim, nprobe and ef_search must be positive",
        "another store": "unknown store kind 'pinecone'",
    }
    with running_server(create_app(folder, tiny_model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").json()["status"] == "ok"
        for name, text in broken.items():
            swap_manifest(folder, text)
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="fashion_cir.retrieval.folder"):
                health = [client.get("/health") for _ in range(3)]
                search = client.post("/search", data={"id": "item-001", "text": "is red", "k": 12})
                answers = [client.get("/items"), client.get("/items/item-002"), client.get("/images/item-002")]
            assert [r.status_code for r in health + [search] + answers] == [200] * 7, name
            body = health[0].json()
            assert body["status"] == "degraded" and body["items"] == 12, name
            prefix = "the index changed but cannot be opened, the previous version is served: "
            assert body["problem"].startswith(prefix)
            assert reasons[name] in body["problem"] and str(tmp_path) not in body["problem"], body["problem"]
            assert "\n" not in body["problem"] and len(search.json()["results"]) == 11
            assert len(caplog.records) == 1  # logged once per change, not per request
        swap_manifest(folder, good)
        health = client.get("/health").json()
        assert health["status"] == "ok" and "problem" not in health


def test_a_tampered_root_cannot_widen_what_images_serves(tmp_path, tiny_model):
    """Issue 22 item 9: root "/" in index.json plus a tampered paths.json let /images serve any
    .jpg/.png/.webp on disk."""
    paths, metadata = synthetic_catalog(tmp_path / "catalog" / "images", 12)
    folder = build_index(tmp_path / "index", tiny_model, paths, metadata, progress=False).folder
    secret = tmp_path / "elsewhere" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(encoded(Image.new("RGB", (20, 20), (1, 2, 3)), "JPEG"))
    manifest = json.loads((folder / "index.json").read_text())
    tampered = folder / "data-999999"
    shutil.copytree(folder / manifest["data"], tampered)
    relative = {i: os.path.relpath(p, "/") for i, p in paths.items()} | {"item-002": os.path.relpath(secret, "/")}
    (tampered / "paths.json").write_text(json.dumps(relative))
    with running_server(create_app(folder, tiny_model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        swap_manifest(folder, json.dumps({**manifest, "root": "/", "data": tampered.name}))
        image = client.get("/images/item-002")
        assert image.status_code == 200 and image.content == paths["item-002"].read_bytes()  # the last good index
        health = client.get("/health").json()
        assert health["status"] == "degraded" and "field 'root' must be the absolute folder" in health["problem"]


def test_a_repeated_search_field_is_refused(served):
    """Issue 22 item 10: a repeated id field silently took the last one."""
    client, _, _ = served
    photo = encoded(Image.new("RGB", (80, 100), (200, 30, 30)), "JPEG")
    for form, files, name, times in [
        ({"id": ["item-001", "item-002"], "text": "is red"}, None, "id", 2),
        ({"id": "item-001", "text": ["is red", "is blue", "x"]}, None, "text", 3),
        ({"id": "item-001", "text": "x", "k": ["5", "6"]}, None, "k", 2),
        ({"text": "x"}, [("image", ("a.jpg", photo, "image/jpeg"))] * 2, "image", 2),
    ]:
        response = client.post("/search", data=form, files=files)
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == f"field {name!r} is given {times} times; give it once"
    both = client.post("/search", data={"id": "item-001", "text": "x", "category": ["dress", "hat"]})
    assert both.status_code == 200 and both.json()["filters"] == {"category": ["dress", "hat"]}  # repeatable


@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_filters_that_crashed_are_422(store, request, caplog):
    """Issue 22 item 3: `size == 042` and ~330 nested parentheses (500s, the latter with ~3,000 log
    lines), control characters and >~200 nested `not` on Milvus (500s)."""
    client = request.getfixturevalue("milvus_served" if store == "milvus" else "served")[0]
    cases = [
        ("color == 042", "bad number '042'"),
        ("color in [00]", "bad number '00'"),
        ("(" * 330 + 'color == "red"' + ")" * 330, "nested more than 32 levels deep"),
        ("not " * 250 + 'color == "red"', "nested more than 32 levels deep"),
        ('color == "re\bd"', "control character U+0008"),
        ('color == "re\fd"', "control character U+000C"),
        ('color == "re\0d"', "control character U+0000"),
    ]
    with caplog.at_level(logging.ERROR):
        for text, message in cases:
            response = client.post("/search", data={"id": "item-001", "text": "is red", "filter": text})
            assert response.status_code == 422 and message in response.json()["detail"], (text, response.text)
    assert not caplog.records
    deepest = "not (" * 16 + 'color == "red"' + ")" * 16  # 32 levels: allowed, and run by the store
    assert client.post("/search", data={"id": "item-001", "text": "is red", "filter": deepest}).status_code == 200


def test_the_apps_options_reach_the_service_the_page_and_the_docs(drawings_index):
    model = load_model(backbone="tiny")
    default = create_app(drawings_index, model)
    assert (default.state.service.uploads.workers, default.state.service.uploads.queue) == (2, 16)
    with running_server(default) as url, httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/health").json()
        assert health["page"] == {"search_timeout_ms": 15000, "sample_seed": None}
        pixels = upload_pixel_limit(model.backbone.image_size)
        assert health["limits"] == {
            "max_upload_bytes": 10 * MB,
            "max_pixels": pixels,
            "max_k": 100,
            "max_text_chars": 300,
        }
        info = client.get("/openapi.json").json()["info"]
        assert (info["title"], info["version"]) == ("fashion-cir search", "1")
        assert info["description"] == (
            "Composed image retrieval: a reference image (upload or catalog id) plus a relative caption such as "
            "'is red with long sleeves' -> ranked catalog items."
        )
        reference = client.get("/items", params={"n": 1}).json()["items"][0]["id"]
        found = client.post("/search", data={"id": reference, "text": "is red", "k": 12}).json()["results"]
        assert reference not in {r["id"] for r in found} and len(found) == 11
    options = dict(max_upload_bytes=2 * MB, max_pixels=5000, max_k=12, max_text_chars=20, exclude_reference=False)
    app = create_app(
        drawings_index, model, **options, upload_workers=3, upload_queue=5, search_timeout_s=2.5, sample_seed=11
    )
    assert (app.state.service.uploads.workers, app.state.service.uploads.queue) == (3, 5)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/health").json()
        assert health["page"] == {"search_timeout_ms": 2500, "sample_seed": 11}
        assert health["limits"] == {k: v for k, v in options.items() if k.startswith("max")}
        found = client.post("/search", data={"id": reference, "text": "is red", "k": 12}).json()["results"]
        assert reference in {r["id"] for r in found} and len(found) == 12
        assert_error(client.post("/search", data={"id": reference, "k": 13}), 422, "k")
        assert_error(client.post("/search", data={"id": reference, "text": "x" * 21}), 422, "text")


def test_serve_hands_uvicorn_the_app_built_from_its_options(drawings_index, monkeypatch):
    """`serve` blocks in uvicorn.run (the command-line test runs it for real, in a subprocess); here
    uvicorn.run only records what it is given."""
    import uvicorn

    from fashion_cir.serving.app import serve

    given = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: given.update(app=app, **options))
    model = load_model(backbone="tiny")
    serve(drawings_index, model, max_k=7)
    assert (given["host"], given["port"], given["log_level"]) == ("127.0.0.1", 8000, "info")
    service = given["app"].state.service
    assert service.model is model and service.index.folder == drawings_index and service.limits.max_k == 7
    serve(drawings_index, model, host="0.0.0.0", port=9001)
    assert (given["host"], given["port"]) == ("0.0.0.0", 9001)
