"""Uploads described by the deployed MLLM at search time (``serve --describe-uploads``), over a real
uvicorn server and a real chat-completions server (tests/support/fake_openai_server.py): the MLLM's
record becomes the upload's description, attributes and same-type category, asked once per photo;
when the MLLM fails the attribute heads describe the photo and the answer says so without naming
the MLLM's address; stored answers (precomputed) are refused for uploads."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from fashion_cir.captioning import build_captioner
from fashion_cir.cli import app as cli_app
from fashion_cir.errors import ModelError
from fashion_cir.models.attributes import describe
from fashion_cir.serving.app import create_app
from support.mllm import fake_mllm
from support.records import RED_TSHIRT
from support.serving import indexed_demo_catalog, running_server

CAPTION = "is red with long sleeves"


def _key(raw: bytes) -> str:
    return hashlib.sha1(base64.b64encode(raw)).hexdigest()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("described-uploads")
    (paths, metadata), model, index = indexed_demo_catalog(root)
    photos = sorted(paths)
    return root, paths, metadata, model, index, paths[photos[0]].read_bytes(), paths[photos[1]].read_bytes()


@pytest.fixture(scope="module")
def mllm(catalog):
    """The chat-completions server: the first photo is described (RED_TSHIRT), the second gets garbage."""
    root, *_, described, garbled = catalog
    with fake_mllm(root, {_key(described): "ok", _key(garbled): "garbage"}) as server:
        yield server


def _captioner(base_url: str):
    return build_captioner("openai", model="fake-vlm", base_url=base_url, api_key_env="FCIR_UNSET_KEY", max_retries=0)


@pytest.fixture(scope="module")
def served(catalog, mllm):
    _, _, _, model, index, *_ = catalog
    app = create_app(index, model, upload_captioner=_captioner(mllm[0]))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _search(client: httpx.Client, photo: bytes, **fields) -> dict:
    response = client.post("/search", data={"text": CAPTION, "k": 5, **fields}, files={"image": ("a.jpg", photo)})
    assert response.status_code == 200, response.text
    return response.json()


def _requests(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.is_file() else 0


def test_the_mllm_describes_an_upload_once_and_its_record_drives_the_query(served, catalog, mllm):
    _, _, metadata, *_, described, _ = catalog
    asked_before = _requests(mllm[1])
    body = _search(served, described)
    assert body["prompt"] == {"source": "captioned", "description": RED_TSHIRT["description"]}
    assert body["reference_attributes"] == RED_TSHIRT
    assert body["query_text"] == f"{RED_TSHIRT['description']}, but {CAPTION}"
    same_type = _search(served, described, same_type="true", k=50)
    assert same_type["filters"] == {"category": ["t-shirt"]}
    assert same_type["results"], "the catalog holds t-shirts"
    assert {hit["metadata"]["category"] for hit in same_type["results"]} == {"t-shirt"}
    assert len(same_type["results"]) == sum(m.get("category") == "t-shirt" for m in metadata.values())
    _search(served, described, text="is darker", offset=5)
    assert _requests(mllm[1]) - asked_before == 1  # one photo, asked once: its record is kept by content
    assert served.get("/health").json()["upload_captioner"] == "openai:fake-vlm"


def test_when_the_mllm_gives_no_record_the_heads_describe_the_upload(served, catalog, mllm):
    *_, garbled = catalog
    asked_before = _requests(mllm[1])
    body = _search(served, garbled)
    predicted = body["reference_attributes"]
    assert all(0 < entry["confidence"] <= 1 for entry in predicted.values())
    assert body["prompt"] == {
        "source": "predicted",
        "description": describe(predicted),
        "problem": "the MLLM (openai:fake-vlm) gave no answer in the attribute format; "
        "the attribute heads described the photo",
    }
    assert _requests(mllm[1]) - asked_before == 2  # asked again with the reason, then given up


def test_an_unreachable_mllm_is_reported_without_its_address(catalog):
    _, _, _, model, index, described, _ = catalog
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    app = create_app(index, model, upload_captioner=_captioner(closed))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = _search(client, described)
        by_id = client.post("/search", data={"text": CAPTION, "id": sorted(catalog[1])[2]}).json()
    assert body["prompt"]["source"] == "predicted"
    assert body["prompt"]["problem"] == (
        "the MLLM (openai:fake-vlm) gave no answer; the attribute heads described the photo"
    )
    assert "127.0.0.1" not in json.dumps(body)
    assert by_id["prompt"]["source"] == "catalog"  # a catalog reference never asks the MLLM


def test_stored_answers_cannot_describe_uploads(catalog):
    root, _, _, model, index, *_ = catalog
    answers = root / "answers.jsonl"
    answers.write_text(json.dumps({"image": "x", **RED_TSHIRT}) + "\n")
    with pytest.raises(ModelError, match="cannot describe an uploaded photo"):
        create_app(index, model, upload_captioner=build_captioner("precomputed", model=str(answers)))


def test_serve_builds_the_upload_captioner_from_its_options(catalog, monkeypatch):
    _, _, _, _, index, *_ = catalog
    given = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: given.update(app=app))
    options = ["serve", "--index", str(index), "--describe-uploads", "openai", "--caption-model", "vlm-7b"]
    result = CliRunner().invoke(cli_app, [*options, "--caption-base-url", "http://mllm.internal:8000/v1"])
    assert result.exit_code == 0, result.output
    captioner = given["app"].state.service.describer.captioner
    assert (captioner.model_id, captioner.urls) == ("openai:vlm-7b", ["http://mllm.internal:8000/v1/chat/completions"])
    assert captioner.max_retries == 1  # a shopper waits: one retry, not three
    given.clear()
    result = CliRunner().invoke(cli_app, ["serve", "--index", str(index)])
    assert result.exit_code == 0 and given["app"].state.service.describer is None
