"""Shared fixtures: the read-only datasets folder, a session-wide tiny model, 30 synthetic drawings,
small JPEG writers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub in tests

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first, so that on several workers (``-n 2 --dist loadfile``) the long
    files start at once instead of ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared/datasets`` next to the repository (read-only; never copy it into the repo)."""
    path = (Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets").resolve()
    if not path.is_dir():
        pytest.fail(f"shared datasets not found at {path}: the tests read the real data from ../shared/datasets")
    return path


@pytest.fixture(scope="session")
def clothing_dir(shared_dir) -> Path:
    """The clothing catalog inside the shared datasets (images/, attributes.jsonl, captions/, image_splits/)."""
    return shared_dir / "clothing-dataset"


@pytest.fixture(scope="session")
def drawings(tmp_path_factory):
    """30 synthetic garment drawings with metadata, ``(paths, metadata)`` (ids item-000 to item-029),
    written once per session (per test worker). Read-only: copy before changing a file."""
    from support.serving import synthetic_catalog

    return synthetic_catalog(tmp_path_factory.mktemp("drawings") / "images", 30)


@pytest.fixture(scope="session")
def tiny_model():
    """The zero-shot tiny CIR model (random open_clip config, real tokenizer). Do not modify it."""
    from fashion_cir.models.cir import load_model

    return load_model(backbone="tiny")


def write_jpeg(path: Path, size: tuple[int, int] = (64, 80), seed: int = 0) -> Path:
    """A small, distinct, real JPEG: random noise background plus a coloured rectangle."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    draw.rectangle([x0, y0, x0 + width // 3, y0 + height // 3], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90)
    return path


@pytest.fixture(scope="session")
def make_jpeg():
    return write_jpeg
