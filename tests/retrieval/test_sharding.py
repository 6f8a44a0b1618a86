"""Sharded batch jobs: two real processes fill one feature cache and one caption cache, then merge;
the openai captioning backend spreads requests over two loopback servers with per-server backoff."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fashion_cir import sharding
from fashion_cir.captioning import build_captioner, run_captioning
from fashion_cir.errors import DataError
from fashion_cir.features.cache import FeatureCache
from fashion_cir.models.cir import load_model
from fashion_cir.sharding import merge_feature_parts, parse_shard, select_shard
from support.mllm import fake_mllm
from support.serving import synthetic_catalog

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


def test_shard_parsing_edges(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_shard(None) == (0, 1)  # no torchrun: the whole list
    assert parse_shard(" 2 / 3 ") == (2, 3) and parse_shard("0/1") == (0, 1)
    assert select_shard(["c", "a", "e", "b", "d"], 1, 2) == ["b", "d"]
    assert select_shard(["c", "a", "b"], 0, 1) == ["a", "b", "c"]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DataError, match=r"^bad RANK/WORLD_SIZE in the environment: .*'two'"):
        parse_shard(None)
    with pytest.raises(DataError, match=r"^bad shard '3/3': need 0 <= I < N$"):
        parse_shard("3/3")
    with pytest.raises(DataError, match=r"^bad shard '1-2': expected I/N, e.g. 0/4 \(the first of four\)$"):
        parse_shard("1-2")


def write_part(folder: Path, name: str, ids: list[str], shas: list[str], features: np.ndarray) -> None:
    np.savez(folder / name, ids=np.array(ids), sha1=np.array(shas), features=features.astype(np.float16))


def test_merge_keeps_the_first_row_per_id_and_sha_and_removes_the_inputs(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, 4)).astype(np.float16)
    write_part(tmp_path, "part-1.npz", ["x", "y"], ["s1", "s2"], np.stack([a, b]))
    # a duplicate of (x, s1) with other values, and x again with a new image (another sha1)
    write_part(tmp_path, "part-2.npz", ["x", "x"], ["s1", "s3"], np.stack([c, c]))
    (tmp_path / "other.npz").write_bytes(b"not a part")
    assert merge_feature_parts(str(tmp_path)) == {"parts": 2, "rows": 4, "unique": 3}
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0] == "other.npz"
    assert re.fullmatch(r"part-merged-\d{20}-\d+-[0-9a-f]{8}\.npz", left[1])
    with np.load(tmp_path / left[1], allow_pickle=False) as merged:
        assert merged["ids"].tolist() == ["x", "y", "x"] and merged["sha1"].tolist() == ["s1", "s2", "s3"]
        assert merged["features"].dtype == np.float16
        np.testing.assert_array_equal(merged["features"], np.stack([a, b, c]))


def test_merge_tolerates_a_part_removed_by_a_concurrent_merge(tmp_path, monkeypatch):
    write_part(tmp_path, "part-1.npz", ["x"], ["s1"], np.ones((1, 2)))
    write_part(tmp_path, "part-2.npz", ["y"], ["s2"], np.zeros((1, 2)))
    write = sharding.atomic_write_bytes

    def write_then_lose_a_part(path, data):
        write(path, data)
        (tmp_path / "part-1.npz").unlink()  # another merge got there first

    monkeypatch.setattr(sharding, "atomic_write_bytes", write_then_lose_a_part)
    assert merge_feature_parts(tmp_path) == {"parts": 2, "rows": 2, "unique": 2}
    assert [p.name.startswith("part-merged-") for p in tmp_path.iterdir()] == [True]


def test_merge_errors_leave_the_parts_in_place(tmp_path):
    with pytest.raises(DataError, match=r"^no feature cache parts \(part-\*\.npz\) in "):
        merge_feature_parts(tmp_path)
    write_part(tmp_path, "part-1.npz", ["x"], ["s1"], np.ones((1, 2)))
    np.savez(tmp_path / "part-2.npz", ids=np.array(["y"]), features=np.ones((1, 2)))  # no sha1
    with pytest.raises(
        DataError, match=r"^cannot read feature cache part .*part-2\.npz: .*move it aside and merge again$"
    ):
        merge_feature_parts(tmp_path)
    (tmp_path / "part-2.npz").write_bytes(b"torn")
    with pytest.raises(DataError, match=r"^cannot read feature cache part .*part-2\.npz"):
        merge_feature_parts(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-1.npz", "part-2.npz"]


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
    with (
        fake_mllm(tmp_path, key=SECRET, name="requests-0") as first,
        fake_mllm(tmp_path, key=SECRET, name="requests-1") as second,
    ):
        yield [first, second]


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
