"""Uploads described by the deployed MLLM at search time (``serve --describe-uploads``), over a real
uvicorn server and a real chat-completions server (tests/support/fake_openai_server.py): the MLLM's
record becomes the upload's description, attributes and same-type category, asked once per photo;
when the MLLM fails the attribute heads describe the photo and the answer says so without naming
the MLLM's address; stored answers (precomputed) and options that do not fit are refused; the MLLM
sees the decoded photo, reduced; one that raises or stays silent is left alone for a while."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image
from typer.testing import CliRunner

from fashion_cir.captioning import Captioner, build_captioner
from fashion_cir.cli import app as cli_app
from fashion_cir.errors import ModelError
from fashion_cir.models.attributes import describe
from fashion_cir.models.cir import load_model
from fashion_cir.serving.app import create_app
from fashion_cir.serving.describer import UploadDescriber
from support.mllm import fake_mllm
from support.records import RED_TSHIRT
from support.serving import indexed_demo_catalog, running_server

CAPTION = "is red with long sleeves"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("described-uploads")
    (paths, metadata), model, index = indexed_demo_catalog(root)
    photos = sorted(paths)
    return root, paths, metadata, model, index, paths[photos[0]].read_bytes(), paths[photos[1]].read_bytes()


@pytest.fixture(scope="module")
def mllm(catalog):
    """The chat-completions server: every photo is a red t-shirt (RED_TSHIRT)."""
    with fake_mllm(catalog[0]) as server:
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


def test_when_the_mllm_gives_no_record_the_heads_describe_the_upload(catalog, tmp_path):
    _, _, _, model, index, _, photo = catalog
    with fake_mllm(tmp_path, {"default": "garbage"}) as (url, log):
        app = create_app(index, model, upload_captioner=_captioner(url))
        with running_server(app) as served, httpx.Client(base_url=served, timeout=60) as client:
            body = _search(client, photo)
            again = _search(client, photo, text="is darker")
    predicted = body["reference_attributes"]
    assert all(0 < entry["confidence"] <= 1 for entry in predicted.values())
    assert body["prompt"] == {
        "source": "predicted",
        "description": describe(predicted),
        "problem": "the MLLM (openai:fake-vlm) gave no answer in the attribute format; "
        "the attribute heads described it",
    }
    assert again["prompt"]["problem"] == body["prompt"]["problem"]
    assert _requests(log) == 2  # asked again once with the reason, then kept as invalid for this photo


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
    assert body["prompt"]["problem"] == ("the MLLM (openai:fake-vlm) gave no answer; the attribute heads described it")
    assert "127.0.0.1" not in json.dumps(body)
    assert by_id["prompt"]["source"] == "catalog"  # a catalog reference never asks the MLLM
    headless = create_app(index, load_model(backbone="tiny"), upload_captioner=_captioner(closed))
    with running_server(headless) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = _search(client, described)
    assert body["prompt"] == {
        "source": "none",
        "description": None,
        "problem": "the MLLM (openai:fake-vlm) gave no answer; it has no description",
    }


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
    assert captioner.max_retries == 0  # a shopper waits: one try, then the heads
    given.clear()
    result = CliRunner().invoke(cli_app, ["serve", "--index", str(index)])
    assert result.exit_code == 0 and given["app"].state.service.describer is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--describe-uploads", "precomputed", "--caption-model", "a.jsonl"], "openai or llava-hf"),
        (["--describe-uploads", "openai", "--caption-base-url", "http://h/v1"], "needs --caption-model"),
        (["--describe-uploads", "openai", "--caption-model", "m"], "--caption-base-url (its API root"),
        (["--describe-uploads", "llava-hf", "--caption-base-url", "http://h/v1"], "is for --describe-uploads openai"),
        (["--caption-model", "m"], "give it too"),
    ],
)
def test_serve_refuses_upload_captioner_options_that_do_not_fit(catalog, monkeypatch, options, message):
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: pytest.fail("served despite bad options"))
    result = CliRunner().invoke(cli_app, ["serve", "--index", str(catalog[4]), *options])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


class _Recording(Captioner):
    """Answers RED_TSHIRT (or raises ``error``) and records the size and format of each photo it is shown."""

    model_id = "recording"

    def __init__(self, error: Exception | None = None):
        super().__init__()
        self.error, self.shown = error, []

    def answer(self, requests):
        for request in requests:
            with Image.open(request.path) as photo:
                self.shown.append((photo.format, photo.size))
        if self.error is not None:
            raise self.error
        return [json.dumps(RED_TSHIRT) for _ in requests]


def test_the_mllm_sees_the_decoded_photo_at_most_1024_pixels_on_its_long_side():
    captioner = _Recording()
    photo = Image.new("RGB", (2000, 1500), (200, 30, 30))
    record, problem = UploadDescriber(captioner).describe(b"raw upload bytes", photo)
    assert (record, problem) == (RED_TSHIRT, None)
    assert captioner.shown == [("JPEG", (1024, 768))]


def test_an_mllm_that_raises_or_stays_silent_is_left_alone_for_a_while(caplog):
    now = [0.0]
    captioner = _Recording(error=RuntimeError("CUDA out of memory"))
    describer = UploadDescriber(captioner, pause_s=30, clock=lambda: now[0])
    photo = Image.new("RGB", (64, 64))
    silent = (None, "the MLLM (recording) gave no answer")
    assert describer.describe(b"first", photo) == silent
    assert "CUDA out of memory" in caplog.text  # the details go to the log
    now[0] = 29.0
    assert describer.describe(b"second", photo) == silent
    assert len(captioner.shown) == 1  # not asked while it is left alone
    now[0] = 31.0
    captioner.error = None
    assert describer.describe(b"second", photo) == (RED_TSHIRT, None)
    assert describer.describe(b"second", photo) == (RED_TSHIRT, None)
    assert len(captioner.shown) == 2  # the record is kept by content


class _Held(_Recording):
    """Answers only once ``release`` is set."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def answer(self, requests):
        assert self.release.wait(timeout=120), "never released"
        return super().answer(requests)


def test_searches_of_one_new_photo_wait_for_one_answer():
    captioner, photo, answers = _Held(), Image.new("RGB", (64, 64)), []
    describer = UploadDescriber(captioner)
    searches = [threading.Thread(target=lambda: answers.append(describer.describe(b"same", photo))) for _ in range(3)]
    for search in searches:
        search.start()
    deadline = time.monotonic() + 120
    while describer.waiting < 2:  # one search asks, two wait for its answer
        assert time.monotonic() < deadline, "the other searches never waited"
        time.sleep(0.01)
    captioner.release.set()
    for search in searches:
        search.join(timeout=120)
    assert answers == [(RED_TSHIRT, None)] * 3
    assert len(captioner.shown) == 1 and describer.waiting == 0
