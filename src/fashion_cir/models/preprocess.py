"""Image preprocessing: CLIP's standard transform and CLIP4Cir's ``targetpad``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from ..errors import ModelError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_MODES = ("clip", "targetpad")


class TargetPad:
    """CLIP4Cir's ``TargetPad``: an image more elongated than ``ratio`` (long / short side) gets
    ``int((long / ratio - short) / 2)`` black pixels on each side of its short dimension (so the
    result may stay a pixel short of the ratio, exactly as in CLIP4Cir); others pass unchanged."""

    def __init__(self, ratio: float = 1.25):
        if ratio < 1:
            raise ValueError(f"targetpad ratio must be >= 1, got {ratio}")
        self.ratio = ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        long_side, short_side = max(width, height), min(width, height)
        if long_side / short_side <= self.ratio:  # CLIP4Cir pads these by int(0 / 2) = 0 px
            return image
        scaled = long_side / self.ratio
        horizontal, vertical = max(int((scaled - width) / 2), 0), max(int((scaled - height) / 2), 0)
        return TF.pad(image, [horizontal, vertical, horizontal, vertical], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"TargetPad(ratio={self.ratio})"


def build_transform(
    mode: str = "clip",
    size: int = 224,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    targetpad_ratio: float = 1.25,
) -> Callable[[Image.Image], torch.Tensor]:
    """``clip``: resize shorter side (bicubic), center crop, normalise. ``targetpad``: pad first."""
    if mode not in PREPROCESS_MODES:
        raise ModelError(f"unknown preprocessing {mode!r}; choose one of {PREPROCESS_MODES}")
    steps: list[Callable] = [TargetPad(targetpad_ratio)] if mode == "targetpad" else []
    steps += [
        Resize(size, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(size),
        ToTensor(),
        Normalize(mean, std),
    ]
    return Compose(steps)


def describe_transform(mode: str, size: int, targetpad_ratio: float = 1.25) -> str:
    """A stable string naming the preprocessing, part of every feature-cache key."""
    return f"{mode}:{size}" + (f":ratio={targetpad_ratio}" if mode == "targetpad" else "")
