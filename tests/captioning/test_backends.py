"""Live backends: an OpenAI-compatible HTTP server in a separate process, and a tiny random LLaVA
going through the real transformers processor + generate path; a server that echoes the API key
in its 401s leaves it in no output or file, and the openai backend needs a base URL."""

import base64
import hashlib
import importlib.util
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from transformers import LogitsProcessorList
from typer.testing import CliRunner

from fashion_cir.captioning import build_captioner, run_captioning
from fashion_cir.cli import app
from fashion_cir.errors import ModelError
from support.mllm import fake_mllm
from support.records import RED_TSHIRT

HELPERS = Path(__file__).resolve().parents[1] / "support"
SECRET = "sk-test-never-log-me"
runner = CliRunner()


@pytest.fixture()
def images(tmp_path):
    """Six small distinct JPEGs and the sha1 of their base64 payloads."""
    paths, keys = {}, {}
    for index in range(6):
        path = tmp_path / f"img{index}.jpg"
        Image.new("RGB", (16, 16), (40 * index, 10, 200 - 30 * index)).save(path)
        paths[f"img{index}"] = path
        keys[f"img{index}"] = hashlib.sha1(base64.b64encode(path.read_bytes())).hexdigest()
    return paths, keys


@pytest.fixture()
def server(tmp_path, images):
    _, keys = images
    behaviours = dict(zip(keys.values(), ["ok", "fenced", "slow_once", "error500_once", "garbage", "bad_body"]))
    with fake_mllm(tmp_path, behaviours, SECRET) as running:
        yield running


def test_openai_backend_against_real_http_server(tmp_path, images, server, monkeypatch, caplog):
    paths, _ = images
    base_url, log = server
    monkeypatch.setenv("FCIR_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    captioner = build_captioner(
        "openai",
        model="fake-vlm",
        base_url=base_url,
        api_key_env="FCIR_TEST_KEY",
        concurrency=3,
        timeout_s=1.0,
        max_retries=2,
        backoff_s=0.05,
    )
    result = run_captioning(paths, captioner, tmp_path / "cache", max_attempts=2, progress=False)
    assert set(result) == {"img0", "img1", "img2", "img3"}  # ok, fenced (repaired), slow once, 500 once
    assert result["img1"]["color"] == "grey" and result["img1"]["category"] == "t-shirt"
    cache_file = next((tmp_path / "cache").glob("openai_fake-vlm.*.jsonl"))
    records = {r["image"]: r for r in map(json.loads, cache_file.read_text().splitlines())}
    assert records["img4"]["status"] == "invalid" and records["img4"]["attempts"] == 2
    assert "cannot describe" in records["img4"]["raw"]
    assert records["img5"]["status"] == "error" and "malformed response body" in records["img5"]["error"]
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(r["auth_ok"] and r["path"] == "/v1/chat/completions" for r in requests)
    written = cache_file.read_text() + next((tmp_path / "cache").glob("*.summary.json")).read_text() + caplog.text
    assert SECRET not in written and SECRET not in repr(captioner)
    # a rerun retries only the request error (bad_body), reusing every finished answer
    run_captioning(paths, captioner, tmp_path / "cache", max_attempts=2, progress=False)
    summary = json.loads(next((tmp_path / "cache").glob("*.summary.json")).read_text())
    assert summary["captioned_now"] == 1 and summary["reused_from_cache"] == 5


def test_tiny_llava_garbage_is_recorded_as_failures(tmp_path, monkeypatch, clothing_dir):
    spec = importlib.util.spec_from_file_location("tiny_llava", HELPERS / "tiny_llava.py")
    tiny_llava = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_llava)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_llava.build_tiny_llava(tmp_path / "tiny-llava")
    captioner = build_captioner("llava-hf", model=str(folder), batch_size=2, max_new_tokens=12, device="cpu")
    paths = {p.stem: p for p in sorted((clothing_dir / "images").iterdir())[:3]}
    paths["corrupt"] = tmp_path / "corrupt.jpg"
    paths["corrupt"].write_bytes(b"not a jpeg at all")
    result = run_captioning(paths, captioner, tmp_path / "cache", max_attempts=2, progress=False)
    assert result == {}
    records = [json.loads(line) for line in next((tmp_path / "cache").glob("*.jsonl")).read_text().splitlines()]
    assert len(records) == 4
    by_image = {r["image"]: r for r in records}
    assert by_image["corrupt"]["status"] == "error" and "corrupt.jpg" in by_image["corrupt"]["error"]
    for image_id in list(paths)[:3]:
        record = by_image[image_id]
        assert record["status"] == "invalid" and record["attempts"] == 2 and record["raw"].strip()


class ForcedAnswers:
    """A LogitsProcessor that makes row ``i`` of a batch generate ``answers[i]`` then end: every
    other token's score is set to -inf. Only the choice of the next token changes; the prompt, the
    image features and the model's forward passes are the real ones."""

    def __init__(self, token_ids: list[list[int]], eos_id: int):
        self.token_ids, self.eos_id, self.start = token_ids, eos_id, None

    def __call__(self, input_ids, scores):
        import torch

        self.start = input_ids.shape[1] if self.start is None else self.start
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(self.token_ids):
            forced[row, ids[step] if step < len(ids) else self.eos_id] = 0.0
        return forced


def test_tiny_llava_valid_answers_become_attributes(tmp_path, monkeypatch, clothing_dir):
    """Two images in one batch, each forced (at the sampling step only) to its own valid JSON answer:
    the decoded text goes through the real processor and parser into the right image's attributes."""
    spec = importlib.util.spec_from_file_location("tiny_llava", HELPERS / "tiny_llava.py")
    tiny_llava = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_llava)
    records = [
        {**RED_TSHIRT, "description": "a plain red short-sleeve cotton t-shirt"},
        {
            "category": "dress",
            "color": "black",
            "secondary_color": "white",
            "pattern": "striped",
            "sleeves": "long",
            "neckline": "v-neck",
            "length": "knee",
            "material": "knit",
            "closure": "zip",
            "kids": False,
            "description": "a black knee-length striped knit dress with a v-neck",
        },
    ]
    answers = [json.dumps(r) for r in records]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_llava.build_tiny_llava(tmp_path / "tiny-llava", answers=answers)
    captioner = build_captioner("llava-hf", model=str(folder), batch_size=2, max_new_tokens=40, device="cpu")
    tokenizer = captioner.processor.tokenizer
    token_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    assert tokenizer.unk_token_id not in sum(token_ids, []) and max(map(len, token_ids)) < 40
    generate = captioner.model.generate
    forced: list[ForcedAnswers] = []

    def generate_forced(*args, **kwargs):
        forced.append(ForcedAnswers(token_ids, tokenizer.eos_token_id))
        return generate(*args, logits_processor=LogitsProcessorList([forced[-1]]), **kwargs)

    monkeypatch.setattr(captioner.model, "generate", generate_forced)
    paths = {p.stem: p for p in sorted((clothing_dir / "images").iterdir())[:2]}
    result = run_captioning(paths, captioner, tmp_path / "cache", max_attempts=1, progress=False)
    assert len(forced) == 1  # one batch of two, through the real generate loop
    assert set(result) == set(paths)
    for image_id, record in zip(paths, records):
        assert result[image_id].to_record(image_id) == {"image": image_id, **record}
    stored = [json.loads(line) for line in next((tmp_path / "cache").glob("*.jsonl")).read_text().splitlines()]
    assert {r["image"]: r["status"] for r in stored} == dict.fromkeys(paths, "ok")
    assert [json.loads(r["raw"]) for r in sorted(stored, key=lambda r: list(paths).index(r["image"]))] == records


def test_llava_missing_weights_says_how_to_pass_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="pass the folder"):
        build_captioner("llava-hf", model=str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(ModelError, match="could not be fetched from the Hugging Face hub"):
        build_captioner("llava-hf", device="cpu")


# -- failures that said nothing, and secrets (issue 12) --
class _EchoingUnauthorized(BaseHTTPRequestHandler):
    """A server that rejects every request with a 401 whose body echoes the Authorization header."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps(
            {"error": {"message": f"Incorrect API key provided: {self.headers.get('Authorization')}"}}
        ).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def unauthorized_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingUnauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_secrets_are_never_stored_and_a_run_where_all_failed_exits_2(
    tmp_path, make_jpeg, monkeypatch, unauthorized_server
):
    """Issue 12 items 13 and 14: a 401 body echoing the key was stored verbatim, credentials in base_url were
    kept, and a run where every image failed printed "captioned 0 of N" and exited 0."""
    key, password = "sk-test-0123456789abcdefXYZ", "hunter2-very-secret"
    monkeypatch.setenv("FCIR_HARDEN_KEY", key)
    for i in range(3):
        make_jpeg(tmp_path / "images" / f"img{i}.jpg", seed=i)
    result = runner.invoke(
        app,
        [
            "caption",
            "--images",
            str(tmp_path / "images"),
            "--out",
            str(tmp_path / "attributes.jsonl"),
            "--backend",
            "openai",
            "--model",
            "gpt",
            "--api-key-env",
            "FCIR_HARDEN_KEY",
            "--base-url",
            f"http://alice:{password}@127.0.0.1:{unauthorized_server}/v1",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--max-attempts",
            "1",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "3 of 3 images failed" in result.output and "HTTP 401" in result.output
    for i in range(3):
        assert (
            f"failed: img{i}: HTTP 401 from http://127.0.0.1:{unauthorized_server}/v1/chat/completions" in result.output
        )
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "images" not in p.parts]
    assert written and any(p.name.endswith(".summary.json") for p in written)
    summary = json.loads(next(p for p in written if p.name.endswith(".summary.json")).read_text())
    assert set(summary["failures"]) == {"img0", "img1", "img2"}
    assert all("HTTP 401" in f["error"] for f in summary["failures"].values())
    for text in [result.output] + [p.read_text(errors="replace") for p in written]:
        assert key not in text and password not in text and "alice:" not in text


def test_the_openai_backend_needs_a_base_url(tmp_path, make_jpeg):
    """Issue 12 item 14: without --base-url it silently called the public OpenAI endpoint."""
    make_jpeg(tmp_path / "images" / "a.jpg")
    result = runner.invoke(
        app,
        [
            "caption",
            "--images",
            str(tmp_path / "images"),
            "--out",
            str(tmp_path / "a.jsonl"),
            "--backend",
            "openai",
            "--model",
            "gpt",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 2 and "needs --base-url" in result.output and "Traceback" not in result.output
