"""Parity with CLIP4Cir's own code on hand-computed expectations: ``targetpad`` pads
``int((long / ratio - short) / 2)`` pixels on each side of the short dimension, and FashionIQ's
validation captions join as ``c1.strip('.?, ').capitalize() + " and " + c2.strip('.?, ')``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fashion_cir.data.captions import join_captions_val
from fashion_cir.models.preprocess import TargetPad

WHITE = (255, 255, 255)


# (width, height) -> (padded width, padded height, pixels added on each side); by hand, ratio 1.25:
#   401x533:  533 / 1.25 = 426.4; int((426.4 - 401) / 2) = int(12.7)  = 12 left and right -> 425x533
#   400x534:  534 / 1.25 = 427.2; int((427.2 - 400) / 2) = int(13.6)  = 13                -> 426x534
#   1001x333: 1001 / 1.25 = 800.8; int((800.8 - 333) / 2) = int(233.9) = 233 top and bottom -> 1001x799
#   100x300:  300 / 1.25 = 240;   int((240 - 100) / 2)   = 70                                -> 240x300
#   301x100:  301 / 1.25 = 240.8; int((240.8 - 100) / 2) = int(70.4)  = 70                  -> 301x240
CASES = {
    (401, 533): (425, 533, 12),
    (400, 534): (426, 534, 13),
    (1001, 333): (1001, 799, 233),
    (100, 300): (240, 300, 70),
    (301, 100): (301, 240, 70),
}


@pytest.mark.parametrize("size", list(CASES))
def test_targetpad_matches_clip4cir(size):
    width, height = size
    out_width, out_height, pad = CASES[size]
    out = TargetPad(1.25)(Image.new("RGB", size, WHITE))
    assert out.size == (out_width, out_height)
    pixels = np.asarray(out)
    if width < height:  # bars left and right, the original in between
        assert (pixels[:, :pad] == 0).all() and (pixels[:, pad + width :] == 0).all()
        assert (pixels[:, pad : pad + width] == 255).all()
    else:
        assert (pixels[:pad] == 0).all() and (pixels[pad + height :] == 0).all()
        assert (pixels[pad : pad + height] == 255).all()


def test_images_within_the_ratio_pass_unchanged():
    for size in [(400, 500), (500, 400), (100, 125), (333, 333)]:
        image = Image.new("RGB", size, WHITE)
        assert TargetPad(1.25)(image) is image


@pytest.mark.parametrize(
    "captions, joined",
    [
        (["is darker.", "has long sleeves?"], "Is darker and has long sleeves"),
        (["", "is shorter"], " and is shorter"),  # an empty first caption: CLIP4Cir keeps the " and "
        (["is red", ""], "Is red and "),
        (["Is A T-Shirt", "Has a V-neck, "], "Is a t-shirt and Has a V-neck"),  # capitalize() lowers the rest
        ([" is blue. ", "..."], "Is blue and "),
        (["\tis blue.", "x"], "\tis blue and x"),  # strip('.?, ') keeps tabs, so capitalize() changes nothing
    ],
)
def test_val_caption_join_matches_clip4cir(captions, joined):
    assert join_captions_val(captions) == joined
    c1, c2 = captions
    assert joined == f"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}"


def test_the_fashioniq_val_queries_with_an_empty_first_caption(shared_dir):
    """The 3 of 6,016 FashionIQ val queries whose first caption is empty join as CLIP4Cir joins them."""
    root = shared_dir / "fashion-iq"
    empty = []
    for category in ("dress", "shirt", "toptee"):
        for item in json.loads((root / "captions" / f"cap.{category}.val.json").read_text()):
            if not item["captions"][0].strip(".?, "):
                empty.append(item["captions"])
    assert len(empty) == 3
    for captions in empty:
        assert join_captions_val(captions) == f" and {captions[1].strip('.?, ')}"
