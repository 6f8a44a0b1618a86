"""Images encoded in memory for decoding and upload tests."""

from __future__ import annotations

import io

from PIL import Image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    """``image`` saved as ``fmt`` (a PIL format name: JPEG, PNG, TIFF, ...), as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()
