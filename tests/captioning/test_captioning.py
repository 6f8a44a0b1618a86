"""Captioning: answer repair/validation, precomputed files, vocab overrides, cache, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fashion_cir.captioning import (
    DEFAULT_VOCABULARY,
    InvalidAnswer,
    build_captioner,
    load_precomputed,
    load_vocabulary,
    run_captioning,
    write_attributes,
)
from fashion_cir.captioning.cache import CaptionCache
from fashion_cir.captioning.parse import parse_answer
from fashion_cir.captioning.precomputed import PrecomputedCaptioner
from fashion_cir.errors import DataError, ModelError
from support.records import RED_TSHIRT

HELPERS = Path(__file__).resolve().parents[1] / "support"
GOOD = RED_TSHIRT


@pytest.fixture(scope="module")
def attributes_file(clothing_dir) -> Path:
    return clothing_dir / "attributes.jsonl"


def test_repairs_fenced_json_prose_case_and_synonyms():
    answer = dict(GOOD, Category="Tee", colour="Gray", secondary_color="none", kids="No", neckline="Crew Neck")
    del answer["category"], answer["color"]
    raw = "Sure! Here it is:\n```json\n" + json.dumps(answer)[:-1] + ",}\n```\nHope this helps, the shirt is nice."
    attrs = parse_answer(raw, DEFAULT_VOCABULARY)
    assert attrs["category"] == "t-shirt" and attrs["color"] == "grey" and attrs["neckline"] == "crew"
    assert attrs["secondary_color"] is None and attrs.kids is False
    assert parse_answer("The answer is " + json.dumps(GOOD) + " as requested.", DEFAULT_VOCABULARY)["color"] == "red"


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("I cannot see a garment.", "no JSON object"),
        (json.dumps(dict(GOOD, color="teal-ish")), "'color'"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "pattern"}), "missing 'pattern'"),
        (json.dumps(dict(GOOD, description="")), "description"),
    ],
)
def test_rejects_what_cannot_be_repaired(raw, reason):
    with pytest.raises(InvalidAnswer, match=reason):
        parse_answer(raw, DEFAULT_VOCABULARY)


def test_load_precomputed_clothing_catalog(attributes_file):
    attrs = load_precomputed(attributes_file)
    assert len(attrs) == 5756
    first = attrs["00003aeb-ace5-43bf-9a0c-dc31a03e9cd2"]
    assert first["category"] == "t-shirt" and first["secondary_color"] == "multicolor" and not first.kids


def test_precomputed_errors_name_file_and_line(tmp_path, attributes_file):
    with pytest.raises(DataError, match="attributes file not found"):
        load_precomputed(tmp_path / "missing.jsonl")
    lines = attributes_file.read_text().splitlines()[:3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2"):
        load_precomputed(bad)
    record = json.loads(lines[1])
    record["pattern"] = "paisley swirls"
    bad.write_text("\n".join([lines[0], "", json.dumps(record)]) + "\n")
    with pytest.raises(DataError, match=r"line 3 .*'pattern'"):
        load_precomputed(bad)
    bad.write_text("\n".join([lines[0], lines[0]]) + "\n")
    with pytest.raises(DataError, match="line 2: duplicate image id"):
        load_precomputed(bad)


def test_write_attributes_round_trip(tmp_path, attributes_file):
    attrs = dict(list(load_precomputed(attributes_file).items())[:20])
    write_attributes(tmp_path / "a.jsonl", attrs)
    assert load_precomputed(tmp_path / "a.jsonl") == attrs


def test_vocabulary_override_from_json(tmp_path):
    raw = DEFAULT_VOCABULARY.model_dump(mode="json")
    raw["attributes"]["color"]["values"].append("teal")
    raw["attributes"]["color"]["synonyms"]["turquoise"] = "teal"
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(raw))
    vocab = load_vocabulary(path)
    assert parse_answer(json.dumps(dict(GOOD, color="Turquoise")), vocab)["color"] == "teal"
    raw["attributes"]["color"]["synonyms"]["mint"] = "seafoam"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="vocab.json"):
        load_vocabulary(path)


def test_unknown_backend_and_missing_options():
    with pytest.raises(ModelError, match="unknown captioning backend 'blip'"):
        build_captioner("blip")
    with pytest.raises(ModelError, match="needs the path"):
        build_captioner("precomputed")


def test_cache_cuts_torn_last_line(tmp_path):
    cache = CaptionCache(tmp_path, "m", "v1")
    cache.append([{"key": "a", "status": "ok"}, {"key": "b", "status": "invalid"}])
    with cache.path.open("a") as handle:
        handle.write('{"key": "c", "sta')
    assert set(cache.load()) == {"a", "b"}
    cache.append([{"key": "c", "status": "ok"}])
    assert [json.loads(line)["key"] for line in cache.path.read_text().splitlines()] == ["a", "b", "c"]


def _images(clothing_dir: Path, n: int) -> dict[str, Path]:
    ids = json.loads((clothing_dir / "image_splits/split.clothing.train.json").read_text())[:n]
    return {i: clothing_dir / "images" / f"{i}.jpg" for i in ids}


def test_run_captioning_precomputed_records_missing_as_failures(tmp_path, clothing_dir, attributes_file):
    images = _images(clothing_dir, 40)
    subset = tmp_path / "subset.jsonl"
    keep = [line for line in attributes_file.read_text().splitlines() if json.loads(line)["image"] in list(images)[:30]]
    subset.write_text("\n".join(keep) + "\n")
    images["broken"] = tmp_path / "nope.jpg"
    captioner = PrecomputedCaptioner(subset)
    result = run_captioning(images, captioner, tmp_path / "cache", progress=False)
    assert len(result) == 30 and result == load_precomputed(subset)
    summary = json.loads(next((tmp_path / "cache").glob("*.summary.json")).read_text())
    assert summary["ok"] == 30 and summary["failed"] == 11
    assert summary["failures"]["broken"]["status"] == "unreadable"
    assert {f["status"] for i, f in summary["failures"].items() if i != "broken"} == {"error"}


def test_resume_after_sigkill_yields_one_record_per_image(tmp_path, clothing_dir, attributes_file):
    images = _images(clothing_dir, 240)
    listing = tmp_path / "images.json"
    listing.write_text(json.dumps({k: str(v) for k, v in images.items()}))
    cache_dir = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    worker = subprocess.Popen(
        [sys.executable, str(HELPERS / "caption_worker.py"), str(attributes_file), str(listing), str(cache_dir), "0.5"],
        env=env,
        stderr=subprocess.PIPE,
    )  # 0.5 s a batch of 8
    deadline = time.monotonic() + 300  # a cold interpreter on a busy machine
    while worker.poll() is None:
        files = list(cache_dir.glob("*.jsonl"))
        if files and len(files[0].read_text().splitlines()) >= 40:
            break
        if time.monotonic() > deadline:
            worker.kill()
            pytest.fail(f"fewer than 40 images captioned within 300 s: {worker.communicate()[1].decode()[-2000:]}")
        time.sleep(0.05)
    assert worker.poll() is None, worker.stderr.read().decode()[-2000:]  # 25 batches (12 s) still to go
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    cache_file = next(cache_dir.glob("*.jsonl"))
    before = len(cache_file.read_text().splitlines())
    assert 40 <= before < 240
    result = run_captioning(images, PrecomputedCaptioner(attributes_file), cache_dir, progress=False)
    records = [json.loads(line) for line in cache_file.read_text().splitlines()]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == len(images)  # no duplicate content among these images
    assert sorted(r["image"] for r in records) == sorted(images)
    assert result == {i: a for i, a in load_precomputed(attributes_file).items() if i in images}
    summary = json.loads(next(cache_dir.glob("*.summary.json")).read_text())
    assert summary["reused_from_cache"] == before and summary["captioned_now"] == len(images) - before
