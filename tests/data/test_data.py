"""Triplet loaders (real FashionIQ JSON, partial image folders), image decoding (JPEG, PNG and WebP
only; 16-bit greys; reduced-size decoding), image ids and JSON helpers: what is kept, what is
skipped and counted, and the errors a user sees."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion_cir.data.images import ImageTooLarge, ImageTooThin, find_image, id_problem, open_image
from fashion_cir.data.metadata import load_catalog
from fashion_cir.data.triplets import fashioniq_files, load_fashioniq, load_triplet_set, parse_triplets
from fashion_cir.errors import DataError
from fashion_cir.io import atomic_write_text, file_sha1, iter_jsonl, read_json
from support.images import encoded

CATEGORIES = ("dress", "shirt", "toptee")
VAL_COUNTS = {"dress": 2017, "shirt": 2038, "toptee": 1961}
TRAIN_COUNTS = {"dress": 5985, "shirt": 5988, "toptee": 6027}
VAL_GALLERY = {"dress": 3817, "shirt": 6346, "toptee": 5373}


@pytest.fixture(scope="module")
def fiq(shared_dir) -> Path:
    return shared_dir / "fashion-iq"


def _json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# -- real FashionIQ JSON ------------------------------------------------------------------------


@pytest.mark.parametrize("split,counts", [("train", TRAIN_COUNTS), ("val", VAL_COUNTS)])
def test_fashioniq_with_no_images_skips_and_counts_every_triplet(fiq, tmp_path, split, counts):
    sets = load_fashioniq(fiq, split=split, images=tmp_path)
    assert set(sets) == set(CATEGORIES)
    assert sum(counts.values()) == (18_000 if split == "train" else 6_016)
    for category, triplet_set in sets.items():
        captions, split_file = fashioniq_files(fiq, category, split)
        raw = json.loads(captions.read_text())
        wanted = set(json.loads(split_file.read_text())) | {t[k] for t in raw for k in ("candidate", "target")}
        assert len(raw) == counts[category]
        assert triplet_set.triplets == [] and triplet_set.gallery_ids == []
        assert triplet_set.skipped_triplets == counts[category]
        assert len(triplet_set.missing_images) == len(wanted)
        assert triplet_set.report()["missing_images"] == len(wanted)
        if split == "val":
            assert len(json.loads(split_file.read_text())) == VAL_GALLERY[category]


def test_fashioniq_with_some_images_keeps_those_triplets(fiq, tmp_path, make_jpeg):
    raw = json.loads(fashioniq_files(fiq, "dress", "val")[0].read_text())
    split_ids = json.loads(fashioniq_files(fiq, "dress", "val")[1].read_text())
    present = {raw[i][k] for i in range(4) for k in ("candidate", "target")}
    present.add(raw[10]["candidate"])  # reference only: that triplet must still be skipped
    for n, asin in enumerate(sorted(present)):
        make_jpeg(tmp_path / f"{asin}.jpg", seed=n)
    (tmp_path / f"{raw[0]['target']}.jpg").rename(tmp_path / f"{raw[0]['target']}.png")  # mirrors use .png
    sets = load_fashioniq(fiq, split="val", categories=("dress",), images=tmp_path)
    dress = sets["dress"]
    expected = [t for t in raw if t["candidate"] in present and t["target"] in present]
    assert 4 <= len(expected) < VAL_COUNTS["dress"]
    assert [(t.candidate, t.target, list(t.captions)) for t in dress.triplets] == [
        (t["candidate"], t["target"], t["captions"]) for t in expected
    ]
    assert dress.skipped_triplets == VAL_COUNTS["dress"] - len(expected)
    assert dress.gallery_ids == [i for i in split_ids if i in present]  # split order
    assert dress.image_paths[raw[0]["target"]].suffix == ".png"
    wanted = set(split_ids) | {t[k] for t in raw for k in ("candidate", "target")}
    assert len(dress.missing_images) == len(wanted - present)
    assert not present & set(dress.missing_images)


def test_fashioniq_strict_raises_naming_the_count(fiq, tmp_path):
    captions, split_file = fashioniq_files(fiq, "shirt", "val")
    raw = json.loads(captions.read_text())
    n_missing = len(set(json.loads(split_file.read_text())) | {t[k] for t in raw for k in ("candidate", "target")})
    with pytest.raises(DataError, match=rf"^{n_missing} images referenced by .*cap\.shirt\.val\.json"):
        load_fashioniq(fiq, split="val", categories=("shirt",), images=tmp_path, strict=True)


def test_fashioniq_missing_images_folder_and_bad_category(fiq, tmp_path):
    with pytest.raises(DataError, match="--images"):
        load_fashioniq(fiq)  # fashion-iq/images does not exist in the shared copy
    with pytest.raises(DataError, match="not found"):
        load_fashioniq(fiq, images=tmp_path / "nope")
    with pytest.raises(DataError, match="'skirt'"):
        fashioniq_files(fiq, "skirt", "val")
    with pytest.raises(DataError, match="FashionIQ folder not found"):
        fashioniq_files(tmp_path / "nope", "dress", "val")


# -- generic triplet sets -----------------------------------------------------------------------


def test_duplicate_gallery_ids_are_deduplicated_and_counted(tmp_path, make_jpeg):
    images = tmp_path / "images"
    for n, image_id in enumerate("abcd"):
        make_jpeg(images / f"{image_id}.jpg", seed=n)
    captions = _json(
        tmp_path / "cap.json",
        [
            {"candidate": "a", "target": "b", "captions": ["x", "y"]},
            {"candidate": "c", "target": "d", "captions": ["x"], "reference_prompt": "a red top"},  # d not in split
            {"candidate": "a", "target": "zz", "captions": ["x"]},  # target image missing
        ],
    )
    split = _json(tmp_path / "split.json", ["a", "b", "a", "c", "b", "gone"])
    ts = load_triplet_set(captions, split, images)
    assert ts.gallery_ids == ["a", "b", "c"]
    assert ts.duplicate_gallery_ids == 2
    assert [(t.candidate, t.target) for t in ts.triplets] == [("a", "b"), ("c", "d")]
    assert ts.triplets[1].reference_prompt == "a red top"  # extra fields kept
    assert "d" in ts.image_paths and "d" not in ts.gallery_ids
    assert sorted(ts.missing_images) == ["gone", "zz"]
    assert ts.skipped_triplets == 1
    assert ts.report() == {
        "triplets": 2,
        "gallery_images": 3,
        "missing_images": 2,
        "skipped_triplets": 1,
        "duplicate_gallery_ids": 2,
    }
    with pytest.raises(DataError, match=r"^2 images referenced"):
        load_triplet_set(captions, split, images, strict=True)


def test_missing_images_folder(tmp_path):
    captions = _json(tmp_path / "cap.json", [])
    split = _json(tmp_path / "split.json", [])
    with pytest.raises(DataError, match=r"images folder not found: .*no_such_dir"):
        load_triplet_set(captions, split, tmp_path / "no_such_dir")


def test_malformed_captions_json_names_file_and_line(tmp_path):
    bad = tmp_path / "cap.bad.json"
    bad.write_text('[\n  {"candidate": "a", "target": "b", "captions": ["x"]},\n  {"candidate": "c",,}\n]\n')
    with pytest.raises(DataError, match=r"cap\.bad\.json.*line 3"):
        load_triplet_set(bad, _json(tmp_path / "split.json", []), tmp_path)


def test_captions_entry_missing_target_names_index_and_field(tmp_path):
    captions = _json(
        tmp_path / "cap.json",
        [
            {"candidate": "a", "target": "b", "captions": ["x"]},
            {"candidate": "a", "captions": ["x"]},
        ],
    )
    with pytest.raises(DataError, match=r"cap\.json\[1\]: field 'target'.*None"):
        load_triplet_set(captions, _json(tmp_path / "split.json", []), tmp_path)


@pytest.mark.parametrize(
    "raw,pattern",
    [
        ({"candidate": "a"}, "expected a JSON list"),
        (["a"], r"\[0\]: expected an object"),
        ([{"candidate": "", "target": "b", "captions": ["x"]}], r"\[0\]: field 'candidate'"),
        ([{"candidate": "a", "target": "b", "captions": []}], r"\[0\]: field 'captions'"),
        ([{"candidate": "a", "target": "b", "captions": "x"}], r"\[0\]: field 'captions'"),
        ([{"candidate": "a", "target": "b", "captions": ["x", 3]}], r"\[0\]: field 'captions'"),
    ],
)
def test_parse_triplets_rejects_bad_schema(raw, pattern):
    with pytest.raises(DataError, match=pattern):
        parse_triplets(raw, "src.json")


def test_parse_triplets_test_split_without_target():
    triplets = parse_triplets([{"candidate": "a", "captions": ["x", "y"]}], "t", require_target=False)
    assert triplets[0].target is None and triplets[0].captions == ("x", "y")


def test_split_file_must_be_a_list_of_ids(tmp_path):
    captions = _json(tmp_path / "cap.json", [])
    with pytest.raises(DataError, match=r"image split file .*split\.json"):
        load_triplet_set(captions, _json(tmp_path / "split.json", [1, 2]), tmp_path)
    with pytest.raises(DataError, match=r"image split file not found"):
        load_triplet_set(captions, tmp_path / "absent.json", tmp_path)


# -- images -------------------------------------------------------------------------------------


def test_open_image_good_and_bad_files(tmp_path, make_jpeg):
    good = make_jpeg(tmp_path / "good.jpg", size=(30, 40))
    image = open_image(good)
    assert image.mode == "RGB" and image.size == (30, 40)
    assert open_image(good.read_bytes()).size == (30, 40)

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match=r"corrupt\.jpg: not a readable image"):
        open_image(corrupt)

    data = make_jpeg(tmp_path / "full.jpg", size=(200, 200), seed=3).read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"truncated\.jpg: corrupt or truncated"):
        open_image(truncated)

    with pytest.raises(DataError, match=r"image not found: .*absent\.jpg"):
        open_image(tmp_path / "absent.jpg")
    with pytest.raises(DataError, match=r"30x40 pixels, more than the limit of 1000"):
        open_image(good, max_pixels=1000)


def test_open_image_converts_to_rgb(tmp_path):
    from PIL import Image

    path = tmp_path / "alpha.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(path)
    assert open_image(path).mode == "RGB"


def test_thin_uploads_are_refused_from_the_header():
    """Issue 22 item 1: a 100000x1 PNG (375 bytes) passed the pixel limit, and resizing its short side
    to the model's input made a 6.4M x 64 image (+1.85 GB, 7 s) per request."""
    import io

    from PIL import Image

    def png(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
        return buffer.getvalue()

    for width, height in ((100_000, 1), (1, 100_000), (1_048_576, 1), (641, 80)):
        with pytest.raises(ImageTooThin) as error:
            open_image(png(width, height), max_pixels=1 << 20, target_size=64, max_aspect=8)
        assert str(error.value) == (
            f"uploaded image: image is {width}x{height} pixels, more elongated than 8:1 "
            "(long side over short side); crop it"
        )
    assert open_image(png(640, 80), max_pixels=1 << 20, target_size=64, max_aspect=8).size == (640, 80)
    assert open_image(png(100_000, 1)).size == (100_000, 1)  # catalog files: no aspect limit unless asked
    with pytest.raises(ImageTooLarge, match="2000x1000 pixels, more than the limit of 1000000"):
        open_image(png(2000, 1000), max_pixels=1_000_000, max_aspect=8)


def test_sixteen_bit_greys_convert_in_about_six_bytes_a_pixel():
    """Issue 22 item 1 (the stated bound): a 16-bit grey PNG at the pixel limit was converted through
    three float64 arrays (~26 bytes a pixel, 340 MB for a 224 px model's limit); now the 16-bit
    values, one float32 array scaled in place and the 8-bit result."""
    import tracemalloc

    import numpy as np
    from PIL import Image

    from fashion_cir.data.images import _to_rgb

    values = (np.arange(1_000_000, dtype=np.uint32) % 65536).astype(np.uint16)
    grey = Image.fromarray(values.reshape(1000, 1000))
    tracemalloc.start()
    try:
        rgb = _to_rgb(grey)
        peak = tracemalloc.get_traced_memory()[1]  # numpy's buffers (Pillow's own are not traced)
    finally:
        tracemalloc.stop()
    assert peak < 7 * 1_000_000, peak  # the float64 path peaked at 24 bytes a pixel
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((535, 65)) == (255, 255, 255)  # 0 and 65535


# -- ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_id, problem",
    [
        ("a'b", None),
        ('x"] or id not in ["', None),
        ("robe été", None),
        ("x" * 255, None),
        ("", "an id is a non-empty text"),
        ("../x", "an id is a file name without folders"),
        ("x\\", "an id is a file name without folders"),
        (".hidden", "an id is a file name without folders"),
        ("a\bb", "an id has no control characters"),
        ("a\0b", "an id has no control characters"),
        ("a\x85", "an id has no control characters"),
        ("é" * 128, "an id is at most 255 bytes of UTF-8"),
        ("bad\udcff", "an id is UTF-8 text"),
    ],
)
def test_one_id_grammar(image_id, problem):
    """Issue 22 item 2: one grammar for ids (build, add, remove, the API), control characters refused."""
    assert id_problem(image_id) == problem


def test_catalog_files_outside_the_id_grammar_are_named(tmp_path, make_jpeg):
    make_jpeg(tmp_path / "images" / "ok.jpg")
    bad = make_jpeg(tmp_path / "images" / "bad\x1bid.jpg")
    with pytest.raises(DataError) as error:
        load_catalog(tmp_path / "images")
    assert str(error.value) == f"{bad}: invalid image id 'bad\\x1bid': an id has no control characters"
    with pytest.raises(DataError, match="catalog: invalid image id 'a/b'"):
        load_catalog({"a/b": tmp_path / "images" / "ok.jpg"})


# -- io -----------------------------------------------------------------------------------------


def test_io_helpers(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_text(path, '{"a": 1}')
    assert read_json(path) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temp files left behind
    assert file_sha1(path) == hashlib.sha1(b'{"a": 1}').hexdigest()
    with pytest.raises(DataError, match=r"settings file not found: .*nope\.json"):
        read_json(tmp_path / "nope.json", "settings file")
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataError, match=r"rows\.jsonl, line 4"):
        list(iter_jsonl(lines))
    lines.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(DataError, match=r"line 2: expected an object"):
        list(iter_jsonl(lines))
    bad_utf8 = tmp_path / "latin.json"
    bad_utf8.write_bytes(b'["\xe9"]')
    with pytest.raises(DataError, match="not UTF-8"):
        read_json(bad_utf8)


# -- decoding: allowed formats, names in errors, 16-bit greys, reduced size; ids (issue 12) --
@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "EPS", "GIF", "PPM"])
def test_only_jpeg_png_webp_decoders_run(tmp_path, fmt):
    """Issue 12 item 1: other formats (EPS would start Ghostscript) are refused, with the file named."""
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
    """Issue 12 item 14: the corrupt-image message showed ``<_io.BytesIO object at 0x...>``."""
    path = tmp_path / "x.jpg"
    path.write_text("this is not an image")
    with pytest.raises(DataError) as error:
        open_image(path)
    assert str(path) in str(error.value) and "BytesIO" not in str(error.value)
    with pytest.raises(DataError) as error:
        open_image(b"not an image either")
    assert "uploaded image" in str(error.value) and "BytesIO" not in str(error.value)


def test_sixteen_bit_greys_are_scaled_not_clipped():
    """Issue 12 item 9: a 16-bit mid-grey PNG is mid-grey (128), not white."""
    grey = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert grey.mode == "I;16"
    image = open_image(encoded(grey, "PNG"))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_large_jpeg_uploads_decode_at_reduced_scale():
    """Issue 12 item 2: with a target size, a 4000x3000 JPEG is decoded at 1/8 scale (500x375) and a PNG is
    box-reduced, keeping the short side >= the target."""
    photo = encoded(Image.new("RGB", (4000, 3000), (20, 120, 200)), "JPEG")
    assert open_image(photo, target_size=224).size == (500, 375)
    assert open_image(photo, max_pixels=200_000, target_size=224).size == (500, 375)  # limit applies to decoded pixels
    with pytest.raises(DataError, match="4000x3000 pixels, more than the limit"):
        open_image(photo, max_pixels=200_000)
    png = encoded(Image.new("RGB", (1000, 700), (20, 120, 200)), "PNG")
    assert open_image(png, target_size=224).size == (334, 234)  # reduce(3), rounding up
    assert open_image(png).size == (1000, 700)


def test_ids_cannot_leave_the_images_folder(tmp_path, make_jpeg):
    """Issue 12 item 8: ``../x`` and absolute ids resolved outside the images folder."""
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
