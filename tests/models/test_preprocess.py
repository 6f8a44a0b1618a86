"""TargetPad geometry and the full preprocessing transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fashion_cir.errors import ModelError
from fashion_cir.models.preprocess import CLIP_MEAN, CLIP_STD, TargetPad, build_transform, describe_transform

WHITE = (255, 255, 255)


def test_tall_image_padded_horizontally_centred_with_black_bars():
    out = TargetPad(1.25)(Image.new("RGB", (100, 300), WHITE))
    assert out.size == (240, 300)  # 300 / 1.25 = 240
    pixels = np.asarray(out)
    assert (pixels[:, :70] == 0).all() and (pixels[:, 170:] == 0).all()  # 70 px each side
    assert (pixels[:, 70:170] == 255).all()  # the original, centred


def test_wide_image_padded_vertically():
    out = TargetPad(1.25)(Image.new("RGB", (301, 100), WHITE))
    assert out.size == (301, 240)  # CLIP4Cir: int((301 / 1.25 - 100) / 2) = int(70.4) = 70 above and below
    pixels = np.asarray(out)
    assert (pixels[:70] == 0).all() and (pixels[170:] == 0).all()
    assert (pixels[70:170] == 255).all()


@pytest.mark.parametrize("size", [(100, 120), (120, 100), (100, 125), (100, 100)])
def test_images_within_the_ratio_are_unchanged(size):
    image = Image.new("RGB", size, WHITE)
    assert TargetPad(1.25)(image) is image


def test_targetpad_ratio_must_be_at_least_one():
    with pytest.raises(ValueError):
        TargetPad(0.9)


def _normalised(value: int) -> torch.Tensor:
    return torch.tensor([(value / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])


def test_full_transforms_shape_and_padding_survives():
    image = Image.new("RGB", (100, 300), WHITE)
    clip = build_transform("clip", 224)(image)
    pad = build_transform("targetpad", 224)(image)
    assert clip.shape == pad.shape == (3, 224, 224)
    assert clip.dtype == torch.float32
    black, white = _normalised(0), _normalised(255)
    # clip: resize shorter side to 224 then centre crop -> all white, no bars
    assert torch.allclose(clip[:, :, 0], white[:, None].expand(3, 224), atol=1e-4)
    # targetpad: 240x300 -> 224x280 -> centre crop 224; bars are 70/240*224 ~ 65 px wide
    assert torch.allclose(pad[:, :, :60], black[:, None, None].expand(3, 224, 60), atol=1e-4)
    assert torch.allclose(pad[:, :, 112], white[:, None].expand(3, 224), atol=1e-4)
    assert torch.allclose(pad[:, :, -60:], black[:, None, None].expand(3, 224, 60), atol=1e-4)


def test_unknown_preprocessing_and_descriptions():
    with pytest.raises(ModelError, match="bogus"):
        build_transform("bogus")
    assert describe_transform("clip", 224) != describe_transform("targetpad", 224)
    assert describe_transform("targetpad", 224, 1.25) != describe_transform("targetpad", 224, 1.5)
