"""Sharded batch jobs: two real processes fill one feature cache and one caption cache, then merge;
the openai captioning backend spreads requests over two loopback servers with per-server backoff."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fashion_cir.captioning import build_captioner, run_captioning
from fashion_cir.errors import DataError
from fashion_cir.features.cache import FeatureCache
from fashion_cir.models.cir import load_model
from fashion_cir.sharding import parse_shard, select_shard
from support.serving import synthetic_catalog

HELPERS = Path(__file__).resolve().parents[1] / "support"
REPO = Path(__file__).resolve().parents[2]
SECRET = "shard-test-key"


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fashion_cir.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    paths, _ = synthetic_catalog(tmp_path_factory.mktemp("shards") / "images", 30)
    return paths


def test_shard_selection_and_errors(monkeypatch):
    ids = [f"x{n}" for n in range(11)]
    shards = [select_shard(reversed(ids), i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids) and not set(shards[0]) & set(shards[1])
    assert parse_shard("1/4") == (1, 4)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (2, 3)  # torchrun's environment
    for bad in ("4/4", "1", "a/b", "-1/2", "1/0"):
        with pytest.raises(DataError, match="bad shard"):
            parse_shard(bad)


def test_two_processes_fill_one_feature_cache_then_merge(images, tmp_path):
    folder = str(next(iter(images.values())).parent)
    cache = tmp_path / "cache"
    common = [
        "features",
        "encode",
        "--images",
        folder,
        "--cache-dir",
        str(cache),
        "--backbone",
        "tiny",
        "--batch-size",
        "4",
    ]
    workers = [cli(*common, "--shard", "0/2"), cli(*common, env={"RANK": "1", "WORLD_SIZE": "2"})]
    outputs = [finish(w) for w in workers]
    assert "shard 0/2: 15 images, 15 encoded" in outputs[0] and "shard 1/2: 15 images, 15 encoded" in outputs[1]
    model = load_model(backbone="tiny")
    parts = list(FeatureCache(cache).folder(model.backbone).glob("part-*.npz"))
    assert len(parts) == 2
    assert "merged 2 parts: 30 features (30 rows)" in finish(
        cli("features", "merge", "--cache-dir", str(cache), "--backbone", "tiny")
    )
    assert len(list(FeatureCache(cache).folder(model.backbone).glob("part-*.npz"))) == 1
    merged = FeatureCache(cache)
    ids, features = merged.encode(model.backbone, images, progress=False)
    assert merged.last_stats.computed == 0 and merged.last_stats.reused == 30 and ids == list(images)
    fresh_ids, fresh = FeatureCache(tmp_path / "fresh").encode(model.backbone, images, progress=False)
    np.testing.assert_allclose(features, fresh, atol=2e-3)


@pytest.fixture()
def servers(tmp_path):
    """Two fake chat-completions servers on loopback: [(base_url, request log)]."""
    (tmp_path / "behaviours.json").write_text("{}")
    running = []
    for number in range(2):
        log = tmp_path / f"requests-{number}.jsonl"
        process = subprocess.Popen(
            [
                sys.executable,
                str(HELPERS / "fake_openai_server.py"),
                str(tmp_path / "behaviours.json"),
                SECRET,
                str(log),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        running.append((process, f"http://127.0.0.1:{int(process.stdout.readline())}/v1", log))
    yield [(url, log) for _, url, log in running]
    for process, _, _ in running:
        process.terminate()
        process.wait(timeout=10)


def requests_in(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.is_file() else 0


def test_requests_spread_over_two_servers_and_avoid_a_dead_one(images, servers, tmp_path, monkeypatch):
    monkeypatch.setenv("FCIR_TEST_KEY", SECRET)
    (first, first_log), (second, second_log) = servers
    captioner = build_captioner(
        "openai",
        model="fake-vlm",
        base_url=[first, second],
        api_key_env="FCIR_TEST_KEY",
        concurrency=4,
        timeout_s=5.0,
        max_retries=2,
        backoff_s=0.05,
    )
    result = run_captioning(images, captioner, tmp_path / "cache", progress=False)
    assert len(result) == 30
    assert requests_in(first_log) >= 10 and requests_in(second_log) >= 10
    assert requests_in(first_log) + requests_in(second_log) == 30

    with socket.socket() as sock:  # bound and never listening: refused, and no other test worker can take the port
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        captioner = build_captioner(
            "openai",
            model="fake-vlm",
            base_url=[dead, second],
            api_key_env="FCIR_TEST_KEY",
            concurrency=4,
            timeout_s=5.0,
            max_retries=2,
            backoff_s=0.5,
        )
        before = requests_in(second_log)
        result = run_captioning(images, captioner, tmp_path / "cache-2", progress=False)
    assert len(result) == 30 and requests_in(second_log) - before == 30
    sent_to_dead = captioner.endpoints.sent[0]
    assert 1 <= sent_to_dead <= 8, sent_to_dead  # it backs off, exponentially, while the live one works


def test_two_caption_shards_then_an_unsharded_merge(images, servers, tmp_path):
    (first, first_log), (second, second_log) = servers
    folder = str(next(iter(images.values())).parent)
    out = tmp_path / "attributes.jsonl"
    common = [
        "caption",
        "--images",
        folder,
        "--out",
        str(out),
        "--backend",
        "openai",
        "--model",
        "fake-vlm",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--base-url",
        first,
        "--base-url",
        second,
        "--api-key-env",
        "FCIR_TEST_KEY",
    ]
    env = {"FCIR_TEST_KEY": SECRET}
    workers = [cli(*common, "--shard", f"{i}/2", env=env) for i in range(2)]
    outputs = [finish(w) for w in workers]
    assert all("captioned 15 of 15 images" in o for o in outputs)
    shard_files = sorted((tmp_path / "cache").glob("*.shard-*-of-2.jsonl"))
    assert len(shard_files) == 2
    shard_ids = [{json.loads(line)["image"] for line in f.read_text().splitlines()} for f in shard_files]
    assert not shard_ids[0] & shard_ids[1] and len(shard_ids[0] | shard_ids[1]) == 30
    sent = requests_in(first_log) + requests_in(second_log)
    assert sent == 30
    assert "captioned 30 of 30 images" in finish(cli(*common, env=env))
    assert requests_in(first_log) + requests_in(second_log) == sent  # merged from the shards' caches, no new requests
    merged = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in merged) == sorted(images)
    assert (tmp_path / "attributes.shard-0-of-2.jsonl").is_file()
