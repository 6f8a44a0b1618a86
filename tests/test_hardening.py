"""Hardening (issue 12) on real files and real components: decoder allow-list, reduced-size decoding,
16-bit greys, ids, file modes, fsync, crash-consistent model folders, safe checkpoint loads,
corrupt index folders, confined paths, feature-cache shards, concurrent writers, failure reporting
and secrets. Each test names the item it guards; each fails with that fix reverted."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import fashion_cir.features.cache as cache_module
import fashion_cir.models.cir as cir_module
from fashion_cir.cli import app
from fashion_cir.data.images import find_image, open_image
from fashion_cir.data.triplets import load_triplet_set
from fashion_cir.errors import DataError, FashionCIRError, ModelError
from fashion_cir.features.cache import FeatureCache
from fashion_cir.io import atomic_write_bytes
from fashion_cir.models.cir import CIRModel, load_model
from fashion_cir.models.combiner import Combiner
from fashion_cir.models.factory import create_backbone
from fashion_cir.retrieval import CatalogIndex, add_to_index, build_index
from support.serving import synthetic_catalog

runner = CliRunner()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return synthetic_catalog(tmp_path_factory.mktemp("catalog") / "images", 30)


# -- 1, 9, 14: decoding ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "EPS", "GIF", "PPM"])
def test_only_jpeg_png_webp_decoders_run(tmp_path, fmt):
    """Item 1: other formats (EPS would start Ghostscript) are refused, with the file named."""
    path = tmp_path / f"upload.{fmt.lower()}"
    path.write_bytes(encoded(Image.new("RGB", (16, 12), (200, 10, 10)), fmt))
    with pytest.raises(DataError, match=rf"{path}: not a readable image \(JPEG, PNG or WebP expected\)"):
        open_image(path)
    with pytest.raises(DataError, match="photo.bin: not a readable image"):
        open_image(path.read_bytes(), name="photo.bin")


def test_every_accepted_format_still_decodes(tmp_path):
    picture = Image.new("RGB", (16, 12), (200, 10, 10))
    for fmt in ("JPEG", "PNG", "WEBP"):
        assert open_image(encoded(picture, fmt)).size == (16, 12)


def test_image_errors_name_the_file_never_a_buffer(tmp_path):
    """Item 14: the corrupt-image message showed ``<_io.BytesIO object at 0x...>``."""
    path = tmp_path / "x.jpg"
    path.write_text("this is not an image")
    with pytest.raises(DataError) as error:
        open_image(path)
    assert str(path) in str(error.value) and "BytesIO" not in str(error.value)
    with pytest.raises(DataError) as error:
        open_image(b"not an image either")
    assert "uploaded image" in str(error.value) and "BytesIO" not in str(error.value)


def test_sixteen_bit_greys_are_scaled_not_clipped():
    """Item 9: a 16-bit mid-grey PNG is mid-grey (128), not white."""
    grey = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert grey.mode == "I;16"
    image = open_image(encoded(grey, "PNG"))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_large_jpeg_uploads_decode_at_reduced_scale():
    """Item 2: with a target size, a 4000x3000 JPEG is decoded at 1/8 scale (500x375) and a PNG is
    box-reduced, keeping the short side >= the target."""
    photo = encoded(Image.new("RGB", (4000, 3000), (20, 120, 200)), "JPEG")
    assert open_image(photo, target_size=224).size == (500, 375)
    assert open_image(photo, max_pixels=200_000, target_size=224).size == (500, 375)  # limit applies to decoded pixels
    with pytest.raises(DataError, match="4000x3000 pixels, more than the limit"):
        open_image(photo, max_pixels=200_000)
    png = encoded(Image.new("RGB", (1000, 700), (20, 120, 200)), "PNG")
    assert open_image(png, target_size=224).size == (334, 234)  # reduce(3), rounding up
    assert open_image(png).size == (1000, 700)


# -- 8: ids -----------------------------------------------------------------------------------------
def test_ids_cannot_leave_the_images_folder(tmp_path, make_jpeg):
    """Item 8: ``../x`` and absolute ids resolved outside the images folder."""
    images = tmp_path / "images"
    make_jpeg(images / "a.jpg")
    make_jpeg(tmp_path / "secret.jpg")
    assert find_image(images, "a") == images / "a.jpg"
    for bad in ("../secret", str(tmp_path / "secret"), "sub/a", ".hidden", ""):
        with pytest.raises(DataError, match="invalid image id"):
            find_image(images, bad)
    captions = tmp_path / "cap.json"
    captions.write_text(json.dumps([{"candidate": "../secret", "target": "a", "captions": ["x", "y"]}]))
    split = tmp_path / "split.json"
    split.write_text(json.dumps(["a"]))
    with pytest.raises(DataError, match=rf"{captions}: invalid image id '../secret'"):
        load_triplet_set(captions, split, images)


# -- 4, 11: file modes and durability ----------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    """Item 4: mkstemp left every atomically written file 0600."""
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "index.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "index.json").stat().st_mode) == mode


def test_index_files_are_readable_by_others_under_a_022_umask(tmp_path, tiny_model, catalog):
    old = os.umask(0o022)
    try:
        index = build_index(tmp_path / "index", tiny_model, dict(list(catalog[0].items())[:4]), progress=False)
    finally:
        os.umask(old)
    files = [index.folder / "index.json", *(index.folder / index.config["data"]).iterdir()]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o644}


def test_atomic_writes_and_index_saves_fsync_files_and_folders(tmp_path, monkeypatch, tiny_model, catalog):
    """Item 11: no directory was fsynced after a rename."""
    synced: list[str] = []
    real = os.fsync

    def recording(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert synced == ["file", "dir"]
    synced.clear()
    build_index(tmp_path / "index", tiny_model, dict(list(catalog[0].items())[:4]), progress=False)
    # the data folder's 5 files, the data folder, the index folder after the rename, index.json and its folder
    assert synced.count("file") >= 6 and synced.count("dir") >= 3


def combiner_model(seed: int) -> CIRModel:
    torch.manual_seed(seed)
    backbone = create_backbone("tiny")
    return CIRModel(backbone, "combiner", Combiner(backbone.feature_dim, 64, 128))


def combiner_state(model: CIRModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("combiner.")}


def test_a_crash_while_saving_a_model_leaves_the_old_or_the_new_pair(tmp_path, monkeypatch):
    """Item 11: weights.pt was swapped before model.json, so a crash between left a mismatched pair."""
    old, new = combiner_model(0), combiner_model(1)
    old.save(tmp_path / "m")

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:  # killed before model.json is replaced: the old model, whole
        patch.setattr(cir_module, "write_json", crash)
        with pytest.raises(RuntimeError):
            new.save(tmp_path / "m")
    loaded = CIRModel.load(tmp_path / "m")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in combiner_state(old).items())

    real_replace = Path.replace
    with monkeypatch.context() as patch:  # killed after model.json, before the weights' rename: the new one
        patch.setattr(Path, "replace", lambda self, target: crash() if self.name.endswith(".tmp") else real_replace(self, target))
        with pytest.raises(RuntimeError):
            new.save(tmp_path / "m")
    loaded = CIRModel.load(tmp_path / "m")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in combiner_state(new).items())
    assert not (tmp_path / "m" / ".weights.pt.tmp").exists()  # the interrupted rename was completed

    torch.save(combiner_state(old), tmp_path / "m" / "weights.pt")  # a pair mixed up by hand
    with pytest.raises(ModelError, match="does not match .*model.json"):
        CIRModel.load(tmp_path / "m")


# -- 3: checkpoints ------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: proof that loading ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    from support.training import load_data, make_dataset

    return load_data(make_dataset(tmp_path_factory.mktemp("train-catalog"), n_train=8, n_val=4, n_annotated=8, n_generated=8))


def test_checkpoints_load_with_weights_only_and_a_crafted_one_runs_nothing(training_data, tmp_path):
    """Item 3: resume used torch.load(weights_only=False), so a crafted checkpoint.pt ran code."""
    from fashion_cir.training import Stage2Config, train_stage2

    triplets, paths, _, records = training_data
    config = Stage2Config(epochs=1, batch_size=8, lr=1e-3, progress=False)
    train_stage2(config, CIRModel(create_backbone("tiny"), "sum"), triplets, paths, None, records, tmp_path / "ok")
    saved = torch.load(tmp_path / "ok" / "checkpoint.pt", weights_only=True)  # every state is plain data
    assert saved["format"] == "fashion-cir-checkpoint/1" and saved["progress"]["epoch"] == 1

    marker = tmp_path / "code-ran"
    (tmp_path / "evil").mkdir()
    torch.save({"format": "fashion-cir-checkpoint/1", "stage": "stage2", "x": _Payload(marker)},
               tmp_path / "evil" / "checkpoint.pt")
    with pytest.raises(FashionCIRError, match="corrupt or unsafe checkpoint"):
        train_stage2(config, CIRModel(create_backbone("tiny"), "sum"), triplets, paths, None, records, tmp_path / "evil")
    assert not marker.exists()


# -- 5, 7: corrupt and hostile index folders -------------------------------------------------------------
@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_model, catalog):
    return build_index(tmp_path_factory.mktemp("small") / "index", tiny_model,
                       dict(list(catalog[0].items())[:8]), catalog[1], progress=False).folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def _set_manifest(folder: Path, **changes) -> None:
    manifest = _manifest(folder)
    for key, value in changes.items():
        if value is KeyError:
            manifest.pop(key)
        else:
            manifest[key] = value
    (folder / "index.json").write_text(json.dumps(manifest))


def _data(folder: Path) -> Path:
    return folder / _manifest(folder)["data"]


CORRUPTIONS = {
    "truncated features.npy": (lambda f: (_data(f) / "features.npy").write_bytes((_data(f) / "features.npy").read_bytes()[:150]), "features.npy"),
    "empty features.npy": (lambda f: (_data(f) / "features.npy").write_bytes(b""), "features.npy"),
    "features.npy of the wrong dimension": (lambda f: np.save(_data(f) / "features.npy", np.zeros((8, 33), np.float32)), "features.npy"),
    "features.npy of the wrong length": (lambda f: np.save(_data(f) / "features.npy", np.zeros((7, 32), np.float32)), "features.npy"),
    "manifest without count": (lambda f: _set_manifest(f, count=KeyError), "index.json"),
    "manifest without nprobe": (lambda f: _set_manifest(f, nprobe=KeyError), "index.json"),
    "manifest with feature_dim wrong": (lambda f: _set_manifest(f, feature_dim=64, blocks={"image": 64}), "features.npy"),
    "manifest whose blocks disagree with feature_dim": (lambda f: _set_manifest(f, feature_dim=64), "index.json"),
    "manifest with a block of no width": (lambda f: _set_manifest(f, blocks={"image": 32, "description": 0}), "index.json"),
    "manifest with blocks as a list": (lambda f: _set_manifest(f, blocks=[32]), "index.json"),
    "data: null": (lambda f: _set_manifest(f, data=None), "index.json"),
    "manifest as a list": (lambda f: (f / "index.json").write_text("[]"), "index.json"),
    "paths.json as a list": (lambda f: (_data(f) / "paths.json").write_text("[]"), "paths.json"),
    "ids.json as an object": (lambda f: (_data(f) / "ids.json").write_text("{}"), "ids.json"),
    "ids.json with a duplicate": (lambda f: (_data(f) / "ids.json").write_text(json.dumps(["item-000"] * 8)), "ids.json"),
    "metadata.json as a list": (lambda f: (_data(f) / "metadata.json").write_text("[]"), "metadata.json"),
    "garbage faiss.index": (lambda f: (_data(f) / "faiss.index").write_bytes(b"junk"), "faiss.index"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_index_folders_are_one_line_naming_the_file(small_index, tmp_path, tiny_model, case):
    """Item 5: these escaped as raw ValueError/EOFError/KeyError/TypeError, or loaded and then every
    search failed."""
    corrupt, file_name = CORRUPTIONS[case]
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    corrupt(folder)
    with pytest.raises(DataError) as error:
        CatalogIndex.load(folder, tiny_model)
    message = str(error.value)
    assert file_name in message and "\n" not in message, message


def test_a_corrupt_index_is_exit_2_on_the_command_line(small_index, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    (_data(folder) / "features.npy").write_bytes(b"")
    result = runner.invoke(app, ["search", "--index", str(folder), "--id", "item-001", "--text", "is red", "--backbone", "tiny"])
    assert result.exit_code == 2, result.output
    assert "corrupt feature file" in result.output and "features.npy" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("entry", ["/etc/passwd", "../../../../../../etc/passwd", "sub/../../outside.jpg"])
def test_image_paths_outside_the_catalog_root_are_refused(small_index, tmp_path, tiny_model, entry):
    """Item 7: /images served whatever paths.json named (/etc/passwd)."""
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    paths = json.loads((_data(folder) / "paths.json").read_text())
    assert not any(os.path.isabs(p) for p in paths.values())  # stored relative to the recorded root
    paths["item-003"] = entry
    (_data(folder) / "paths.json").write_text(json.dumps(paths))
    with pytest.raises(DataError, match=r"paths\.json: the path of 'item-003' .* is not inside the catalog root"):
        CatalogIndex.load(folder, tiny_model)


@pytest.mark.parametrize("data", ["../elsewhere", "/tmp", "data-000001/../../x", "."])
def test_the_manifest_data_folder_stays_inside_the_index(small_index, tmp_path, tiny_model, data):
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    _set_manifest(folder, data=data)
    with pytest.raises(DataError, match="field 'data' must name a data-NNNNNN folder"):
        CatalogIndex.load(folder, tiny_model)


def test_an_index_without_a_catalog_root_asks_for_a_rebuild(small_index, tmp_path, tiny_model):
    folder = tmp_path / "index"
    shutil.copytree(small_index, folder)
    _set_manifest(folder, root=KeyError)
    with pytest.raises(DataError, match="field 'root'.*older fashion-cir, rebuild it"):
        CatalogIndex.load(folder, tiny_model)


def test_adding_images_from_another_folder_widens_the_recorded_root(tmp_path, tiny_model, make_jpeg):
    first = {f"a{i}": make_jpeg(tmp_path / "shop" / "summer" / f"a{i}.jpg", seed=i) for i in range(3)}
    second = {f"b{i}": make_jpeg(tmp_path / "shop" / "winter" / f"b{i}.jpg", seed=10 + i) for i in range(2)}
    build_index(tmp_path / "index", tiny_model, first, progress=False)
    assert _manifest(tmp_path / "index")["root"] == str((tmp_path / "shop" / "summer").resolve())
    index = add_to_index(tmp_path / "index", tiny_model, second, progress=False)
    assert index.config["root"] == str((tmp_path / "shop").resolve())
    loaded = CatalogIndex.load(tmp_path / "index", tiny_model)
    assert loaded.paths == {i: p.resolve() for i, p in {**first, **second}.items()}


# -- 10, 12: feature cache shards and concurrent writers -----------------------------------------------------
def test_a_corrupt_shard_is_moved_aside_and_recomputed(tmp_path, tiny_model, catalog):
    """Item 10: any exception deleted the shard."""
    paths = dict(list(catalog[0].items())[:4])
    cache = FeatureCache(tmp_path / "cache")
    ids, first = cache.encode(tiny_model.backbone, paths, progress=False)
    folder = cache.folder(tiny_model.backbone)
    (folder / "part-torn.npz").write_bytes(b"PK\x03\x04 half a zip")
    ids, again = cache.encode(tiny_model.backbone, paths, progress=False)
    assert cache.last_stats.computed == 0 and np.allclose(first, again)
    assert not (folder / "part-torn.npz").exists()
    assert [p.name.split(".npz.")[0] for p in folder.glob("*.corrupt")] == ["part-torn"]


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), MemoryError()])
def test_other_shard_read_errors_never_delete_it(tmp_path, tiny_model, catalog, monkeypatch, error):
    paths = dict(list(catalog[0].items())[:4])
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


def test_two_writers_of_one_cache_never_overwrite_each_others_shards(tmp_path, tiny_model, catalog, monkeypatch):
    """Item 10: shard numbers could collide between two processes writing one cache. Here writer B
    saves its shard after writer A picked a name and before A's rename (the race, made certain)."""
    items = list(catalog[0].items())
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


def test_concurrent_index_adds_take_turns_and_lose_nothing(tmp_path, catalog):
    """Item 12: two concurrent ``index add`` runs loaded the same index and the last save won (or
    picked the same data-N). Both adds are made to encode at the same moment unless one waits."""
    items = list(catalog[0].items())
    base, batch_a, batch_b = dict(items[:10]), dict(items[10:20]), dict(items[20:30])
    model = load_model(backbone="tiny")
    build_index(tmp_path / "index", model, base, progress=False)
    together = threading.Barrier(2, timeout=3)
    encode = model.backbone.encode_image_trunk

    def meeting(pixels):
        with contextlib.suppress(threading.BrokenBarrierError):  # the other add waits for the lock: it never comes
            together.wait()
        return encode(pixels)

    model.backbone.encode_image_trunk = meeting
    errors: list[BaseException] = []

    def add(batch):
        try:
            add_to_index(tmp_path / "index", model, batch, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(batch,)) for batch in (batch_a, batch_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    loaded = CatalogIndex.load(tmp_path / "index", model)
    assert sorted(loaded.ids) == sorted(items_id for items_id, _ in items) and len(set(loaded.ids)) == 30
    assert [p.name for p in (tmp_path / "index").glob("data-*")] == [loaded.config["data"]]


# -- 13, 14: failures that said nothing, and secrets ---------------------------------------------------------
class _EchoingUnauthorized(BaseHTTPRequestHandler):
    """A server that rejects every request with a 401 whose body echoes the Authorization header."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {self.headers.get('Authorization')}"}}).encode()
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


def test_secrets_are_never_stored_and_a_run_where_all_failed_exits_2(tmp_path, make_jpeg, monkeypatch, unauthorized_server):
    """Items 13 and 14: a 401 body echoing the key was stored verbatim, credentials in base_url were
    kept, and a run where every image failed printed "captioned 0 of N" and exited 0."""
    key, password = "sk-test-0123456789abcdefXYZ", "hunter2-very-secret"
    monkeypatch.setenv("FCIR_HARDEN_KEY", key)
    for i in range(3):
        make_jpeg(tmp_path / "images" / f"img{i}.jpg", seed=i)
    result = runner.invoke(app, ["caption", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "attributes.jsonl"),
                                 "--backend", "openai", "--model", "gpt", "--api-key-env", "FCIR_HARDEN_KEY",
                                 "--base-url", f"http://alice:{password}@127.0.0.1:{unauthorized_server}/v1",
                                 "--cache-dir", str(tmp_path / "cache"), "--max-attempts", "1"])
    assert result.exit_code == 2, result.output
    assert "3 of 3 images failed" in result.output and "HTTP 401" in result.output
    for i in range(3):
        assert f"failed: img{i}: HTTP 401 from http://127.0.0.1:{unauthorized_server}/v1/chat/completions" in result.output
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "images" not in p.parts]
    assert written and any(p.name.endswith(".summary.json") for p in written)
    summary = json.loads(next(p for p in written if p.name.endswith(".summary.json")).read_text())
    assert set(summary["failures"]) == {"img0", "img1", "img2"}
    assert all("HTTP 401" in f["error"] for f in summary["failures"].values())
    for text in [result.output] + [p.read_text(errors="replace") for p in written]:
        assert key not in text and password not in text and "alice:" not in text


def test_the_openai_backend_needs_a_base_url(tmp_path, make_jpeg):
    """Item 14: without --base-url it silently called the public OpenAI endpoint."""
    make_jpeg(tmp_path / "images" / "a.jpg")
    result = runner.invoke(app, ["caption", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "a.jsonl"),
                                 "--backend", "openai", "--model", "gpt", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "needs --base-url" in result.output and "Traceback" not in result.output


def test_index_build_lists_each_failure_with_its_reason_and_fails_past_the_share(tmp_path, make_jpeg):
    """Item 14: a non-image x.jpg gave exit 0 and ``"failed_ids": ["x"]`` with no reason anywhere."""
    images = tmp_path / "images"
    for i in range(5):
        make_jpeg(images / f"good{i}.jpg", seed=i)
    (images / "x.jpg").write_text("not an image")
    result = runner.invoke(app, ["index", "build", str(tmp_path / "index"), "--images", str(images), "--backbone", "tiny"])
    assert result.exit_code == 0, result.output
    assert f"failed: x: {images / 'x.jpg'}: not a readable image" in result.output and "BytesIO" not in result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["failures"] == {"x": f"{images / 'x.jpg'}: not a readable image (JPEG, PNG or WebP expected)"}

    for i in range(2):
        (images / f"bad{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    result = runner.invoke(app, ["index", "build", str(tmp_path / "index2"), "--images", str(images), "--backbone", "tiny"])
    assert result.exit_code == 2, result.output
    assert "3 of 8 catalog images failed (more than the allowed 20%); first: bad0: " in result.output
    assert not (tmp_path / "index2" / "index.json").exists()


def test_a_resumed_training_logs_each_step_once(training_data, tmp_path):
    """Kill loop finding: steps logged after the last checkpoint were logged again on resume."""
    from fashion_cir.training import Stage2Config, TrainingStopped, train_stage2

    triplets, paths, _, records = training_data
    config = Stage2Config(epochs=2, batch_size=4, lr=1e-3, progress=False, log_every=1, checkpoint_every=2)
    with pytest.raises(TrainingStopped):  # logs step 3, last checkpoint at step 2: like a kill after step 3
        train_stage2(config.model_copy(update={"stop_after_steps": 3}), CIRModel(create_backbone("tiny"), "sum"),
                     triplets, paths, None, records, tmp_path)
    train_stage2(config, CIRModel(create_backbone("tiny"), "sum"), triplets, paths, None, records, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert steps == list(range(1, summary["global_step"] + 1))
