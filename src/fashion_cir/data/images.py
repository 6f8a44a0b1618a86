"""Loading images safely: clear errors for missing, corrupt or oversized files."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_MAX_PIXELS = 40_000_000


def find_image(folder: Path, image_id: str) -> Path | None:
    """The file for ``image_id`` in ``folder`` (any known extension), or None."""
    for ext in IMAGE_EXTENSIONS:
        candidate = folder / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


def scan_images(folder: Path) -> dict[str, Path]:
    """id (file stem) -> image file for every image in ``folder``; when one id has several files,
    the extension earlier in IMAGE_EXTENSIONS wins (as in :func:`find_image`)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS and path.is_file():
            current = found.get(path.stem)
            if current is None or IMAGE_EXTENSIONS.index(suffix) < IMAGE_EXTENSIONS.index(current.suffix.lower()):
                found[path.stem] = path
    return found


def readable_images(paths: dict[str, Path], workers: int | None = None) -> tuple[dict[str, Path], list[str]]:
    """Split ``paths`` into the images that decode and the ids that do not (decoded in threads;
    Pillow releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    def ok(item: tuple[str, Path]) -> bool:
        try:
            open_image(item[1])
            return True
        except DataError:
            return False

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        flags = list(pool.map(ok, paths.items()))
    good = {i: p for (i, p), flag in zip(paths.items(), flags) if flag}
    return good, [i for (i, _), flag in zip(paths.items(), flags) if not flag]


def open_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode an image to RGB. Raises DataError naming the file for missing, corrupt, truncated
    or decompression-bomb input (``max_pixels`` bounds width*height before decoding)."""
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded image")
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise DataError(f"image not found: {source}")
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > max_pixels:
                raise DataError(f"{label}: image is {width}x{height} pixels, more than the limit of {max_pixels}")
            image.load()
        return image.convert("RGB")
    except DataError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{label}: not a readable image ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{label}: corrupt or truncated image ({exc})") from exc
