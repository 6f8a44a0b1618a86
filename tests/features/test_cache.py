"""The feature cache: reuse, resume after SIGKILL without duplicate work, edited files, keys; a
corrupt shard is moved aside, other read errors never delete one, two writers never collide."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fashion_cir.features.cache as cache_module
from fashion_cir.errors import DataError
from fashion_cir.features.cache import FeatureCache
from fashion_cir.models.factory import create_backbone

N_IMAGES = 40

# Encodes the images of a folder into a cache, slowly (the backbone's trunk, which the cache calls,
# sleeps before each batch and counts its calls), so that the parent can kill it between shards.
# The cache code itself is untouched.
SLOW_ENCODER = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[3]))  # as the parent, so the numbers match bit for bit
from fashion_cir.features.cache import FeatureCache
from fashion_cir.models.factory import create_backbone
root, folder = sys.argv[1], Path(sys.argv[2])
backbone = create_backbone("tiny")
encode = backbone.encode_image_trunk
def slow(pixels):
    print("BATCH", flush=True)
    time.sleep(1.0)  # the parent kills it after the first shard: 9 s to spare on a busy machine
    return encode(pixels)
backbone.encode_image_trunk = slow
paths = {p.stem: p for p in sorted(folder.glob("*.jpg"))}
FeatureCache(root, flush_every=4).encode(backbone, paths, batch_size=4, progress=False)
print("FINISHED")
"""


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, make_jpeg) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for n in range(N_IMAGES):
        make_jpeg(folder / f"img{n:03d}.jpg", size=(48 + n % 5 * 8, 64), seed=n)
    return folder


def _paths(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.glob("*.jpg"))}


def _cached_ids(folder: Path) -> list[str]:
    ids: list[str] = []
    for shard in sorted(folder.glob("part-*.npz")):
        with np.load(shard) as data:
            ids += [str(i) for i in data["ids"]]
    return ids


@pytest.fixture(scope="module")
def reference(tiny_model, image_dir, tmp_path_factory):
    """An uninterrupted run: ids and features."""
    cache = FeatureCache(tmp_path_factory.mktemp("reference_cache"), flush_every=4)
    ids, feats = cache.encode(tiny_model.backbone, _paths(image_dir), batch_size=4, progress=False)
    assert cache.last_stats.computed == N_IMAGES and cache.last_stats.reused == 0
    return cache, ids, feats


def test_second_call_reuses_everything(tiny_model, image_dir, reference):
    cache, ids, feats = reference
    assert ids == sorted(_paths(image_dir)) and feats.shape == (N_IMAGES, tiny_model.backbone.feature_dim)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()
    again_ids, again = cache.encode(tiny_model.backbone, _paths(image_dir), batch_size=4, progress=False)
    assert cache.last_stats.computed == 0 and cache.last_stats.reused == N_IMAGES
    assert again_ids == ids and np.array_equal(again, feats)
    # a fresh FeatureCache object on the same folder (a new process) reuses the shards too
    fresh = FeatureCache(cache.root)
    subset = dict(list(_paths(image_dir).items())[5:9])
    sub_ids, sub = fresh.encode(tiny_model.backbone, subset, progress=False)
    assert fresh.last_stats.computed == 0 and sub_ids == list(subset)
    assert np.array_equal(sub, feats[5:9])
    # shards: 40 images, flush every 4 -> 10 shards, each id stored once
    stored = _cached_ids(cache.folder(tiny_model.backbone))
    assert sorted(stored) == ids


def test_resume_after_sigkill_recomputes_only_what_was_not_saved(tiny_model, image_dir, reference, tmp_path):
    root = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    threads = str(torch.get_num_threads())
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_ENCODER, str(root), str(image_dir), threads],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300  # a cold interpreter loading torch on a busy machine
        while not list(root.glob("*/part-*.npz")):
            if proc.poll() is not None:
                pytest.fail(f"encoder exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no shard written within 300 s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL and b"FINISHED" not in out
    assert 0 < out.count(b"BATCH") < N_IMAGES // 4  # the slowed trunk is the one the cache called
    folders = sorted({shard.parent for shard in root.glob("*/part-*.npz")})
    assert len(folders) == 1 and folders[0] == FeatureCache(root).folder(tiny_model.backbone)
    folder = folders[0]
    already = _cached_ids(folder)
    assert 0 < len(already) < N_IMAGES and len(already) % 4 == 0

    cache = FeatureCache(root, flush_every=4)
    ids, feats = cache.encode(tiny_model.backbone, _paths(image_dir), batch_size=4, progress=False)
    assert cache.last_stats.reused == len(already)
    assert cache.last_stats.computed == N_IMAGES - len(already)
    _, ref_ids, ref_feats = reference
    assert ids == ref_ids
    # the kill falls on a shard boundary (flush_every == batch_size), so the resumed batches are the
    # reference run's batches: the features are identical, not merely close
    assert np.array_equal(feats, ref_feats)
    stored = _cached_ids(folder)
    assert sorted(stored) == sorted(ids)  # every image stored exactly once: no duplicate work


def test_edited_image_is_recomputed(tiny_model, image_dir, tmp_path, make_jpeg):
    folder = tmp_path / "imgs"
    shutil.copytree(image_dir, folder)
    paths = dict(list(_paths(folder).items())[:6])
    cache = FeatureCache(tmp_path / "cache")
    ids, before = cache.encode(tiny_model.backbone, paths, progress=False)
    make_jpeg(paths[ids[2]], size=(48, 64), seed=999)  # same id, different bytes
    ids2, after = cache.encode(tiny_model.backbone, paths, progress=False)
    assert ids2 == ids
    assert cache.last_stats.computed == 1 and cache.last_stats.reused == 5
    assert not np.allclose(after[2], before[2])
    assert np.array_equal(np.delete(after, 2, axis=0), np.delete(before, 2, axis=0))


def test_preprocessing_and_weights_are_part_of_the_key(tiny_model, image_dir, tmp_path):
    paths = dict(list(_paths(image_dir).items())[:4])
    cache = FeatureCache(tmp_path)
    _, clip_feats = cache.encode(tiny_model.backbone, paths, progress=False)
    padded = create_backbone("tiny", preprocess="targetpad")
    other_seed = create_backbone("tiny:1")
    folders = {cache.folder(b) for b in (tiny_model.backbone, padded, other_seed)}
    assert len(folders) == 3
    _, pad_feats = cache.encode(padded, paths, progress=False)
    assert cache.last_stats.computed == 4  # nothing reused across preprocessing
    assert not np.allclose(pad_feats, clip_feats)  # these images are not square: padding changes them
    import json

    meta = json.loads((cache.folder(padded) / "meta.json").read_text())
    assert meta["preprocess"].startswith("targetpad") and meta["backbone"] == "tiny:0"


def test_same_spec_and_preprocessing_with_other_weights_is_not_reused(tiny_model, image_dir, tmp_path):
    """Fine-tuned weights under the same backbone spec and transform (what stage 1 with the image
    tower produces) must not be served the zero-shot model's cached features."""
    paths = dict(list(_paths(image_dir).items())[:4])
    cache = FeatureCache(tmp_path)
    _, before = cache.encode(tiny_model.backbone, paths, progress=False)
    tuned = create_backbone("tiny").eval()
    assert tuned.spec == tiny_model.backbone.spec
    assert tuned.preprocess_description == tiny_model.backbone.preprocess_description
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if name.startswith(tuple(tuned.trunk_prefixes())):
                param.mul_(1.5)
    _, after = cache.encode(tuned, paths, progress=False)
    assert cache.last_stats.computed == 4 and cache.last_stats.reused == 0
    pixels = torch.stack([tuned.preprocess(Image.open(p).convert("RGB")) for p in paths.values()])
    with torch.no_grad():
        direct = tuned.encode_images(pixels).numpy()
    np.testing.assert_allclose(after, direct, rtol=2e-3, atol=2e-3)  # the cache stores fp16
    assert not np.allclose(after, before, rtol=2e-3, atol=2e-3)
    # and the zero-shot model still gets its own features back, untouched
    _, again = cache.encode(tiny_model.backbone, paths, progress=False)
    assert cache.last_stats.reused == 4 and np.array_equal(again, before)


def test_unreadable_and_missing_images(tiny_model, image_dir, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(os.urandom(1000))
    paths = {
        "a": image_dir / "img000.jpg",
        "bad": corrupt,
        "b": image_dir / "img001.jpg",
        "gone": tmp_path / "gone.jpg",
    }
    cache = FeatureCache(tmp_path / "cache")
    ids, feats = cache.encode(tiny_model.backbone, paths, on_error="skip", progress=False)
    assert ids == ["a", "b"] and feats.shape[0] == 2
    assert cache.last_stats.failed == 2 and cache.last_stats.computed == 2
    with pytest.raises(DataError, match=r"gone\.jpg"):
        cache.encode(tiny_model.backbone, paths, progress=False)
    del paths["gone"]
    with pytest.raises(DataError, match=r"corrupt\.jpg: not a readable image"):
        cache.encode(tiny_model.backbone, paths, progress=False)
    with pytest.raises(ValueError):
        cache.encode(tiny_model.backbone, paths, on_error="ignore", progress=False)


# -- corrupt shards and concurrent writers (issue 12) --
def test_a_corrupt_shard_is_moved_aside_and_recomputed(tmp_path, tiny_model, drawings):
    """Issue 12 item 10: any exception deleted the shard."""
    paths = dict(list(drawings[0].items())[:4])
    cache = FeatureCache(tmp_path / "cache")
    ids, first = cache.encode(tiny_model.backbone, paths, progress=False)
    folder = cache.folder(tiny_model.backbone)
    (folder / "part-torn.npz").write_bytes(b"PK\x03\x04 half a zip")
    ids, again = cache.encode(tiny_model.backbone, paths, progress=False)
    assert cache.last_stats.computed == 0 and np.allclose(first, again)
    assert not (folder / "part-torn.npz").exists()
    assert [p.name.split(".npz.")[0] for p in folder.glob("*.corrupt")] == ["part-torn"]


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), MemoryError()])
def test_other_shard_read_errors_never_delete_it(tmp_path, tiny_model, drawings, monkeypatch, error):
    paths = dict(list(drawings[0].items())[:4])
    cache = FeatureCache(tmp_path / "cache")
    cache.encode(tiny_model.backbone, paths, progress=False)
    shards = sorted(cache.folder(tiny_model.backbone).glob("part-*.npz"))
    assert len(shards) == 1

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(cache_module.np, "load", failing)
    with pytest.raises((DataError, MemoryError)) as raised:
        cache.encode(tiny_model.backbone, paths, progress=False)
    if isinstance(error, PermissionError):
        assert "cannot read feature cache shard" in str(raised.value) and shards[0].name in str(raised.value)
    assert shards[0].is_file()


def test_two_writers_of_one_cache_never_overwrite_each_others_shards(tmp_path, tiny_model, drawings, monkeypatch):
    """Issue 12 item 10: shard numbers could collide between two processes writing one cache. Here writer B
    saves its shard after writer A picked a name and before A's rename (the race, made certain)."""
    items = list(drawings[0].items())
    first, second = dict(items[:4]), dict(items[4:8])
    writer_a, writer_b = FeatureCache(tmp_path / "cache"), FeatureCache(tmp_path / "cache")
    real_write = cache_module.atomic_write_bytes
    interleaved = []

    def write(path, data):
        if not interleaved:
            interleaved.append(path.name)
            writer_b.encode(tiny_model.backbone, second, progress=False)
        real_write(path, data)

    monkeypatch.setattr(cache_module, "atomic_write_bytes", write)
    writer_a.encode(tiny_model.backbone, first, progress=False)
    monkeypatch.undo()
    fresh = FeatureCache(tmp_path / "cache")
    fresh.encode(tiny_model.backbone, {**first, **second}, progress=False)
    assert interleaved and fresh.last_stats.computed == 0 and fresh.last_stats.reused == 8
