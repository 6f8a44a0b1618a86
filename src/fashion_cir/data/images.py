"""Loading images safely: only the JPEG, PNG and WebP decoders, clear errors naming the file for
missing, corrupt or oversized input, reduced-size decoding for uploads, 16-bit greys scaled."""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DECODERS = ("JPEG", "PNG", "WEBP")  # never EPS (runs Ghostscript), TIFF, BMP, ... on untrusted files
DEFAULT_MAX_PIXELS = 40_000_000
MAX_ASPECT = 8  # long side / short side of an upload: thinner ones would blow up in the model's resize
MAX_ID_BYTES = 255  # a file name's limit on common file systems (a Milvus key holds 512)
_ID_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ImageTooLarge(DataError):
    """An image with more pixels than allowed (checked from its header, before decoding)."""


class ImageTooThin(DataError):
    """An upload more elongated than allowed (checked from its header, before decoding)."""


def id_problem(image_id: object) -> str | None:
    """Why ``image_id`` is not a catalog id, or None when it is one. The one id grammar (catalogs,
    splits, index build/add/remove, the API): a file name stem of at most :data:`MAX_ID_BYTES`
    bytes of UTF-8, without folder parts, a leading dot or control characters."""
    if not isinstance(image_id, str) or not image_id:
        return "an id is a non-empty text"
    if image_id.startswith(".") or "/" in image_id or "\\" in image_id or os.path.isabs(image_id):
        return "an id is a file name without folders"
    if _ID_CONTROL.search(image_id):
        return "an id has no control characters"
    try:
        size = len(image_id.encode("utf-8"))
    except UnicodeEncodeError:
        return "an id is UTF-8 text"
    return f"an id is at most {MAX_ID_BYTES} bytes of UTF-8" if size > MAX_ID_BYTES else None


def check_image_id(image_id: str, source: str = "") -> str:
    """``image_id`` if it is a catalog id (:func:`id_problem`), else DataError naming ``source``."""
    problem = id_problem(image_id)
    if problem:
        where = f"{source}: " if source else ""
        raise DataError(f"{where}invalid image id {image_id!r}: {problem}")
    return image_id


def find_image(folder: Path, image_id: str) -> Path | None:
    """The file for ``image_id`` in ``folder`` (any known extension), or None; an id that is not a
    plain file name (``../x``, ``/etc/x``) raises DataError instead of resolving outside ``folder``."""
    check_image_id(image_id)
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


def upload_pixel_limit(input_size: int, factor: int = 16) -> int:
    """Pixel limit for uploads to a model whose input is ``input_size`` px: ``factor`` times the
    input on each side (224 px -> 3584 x 3584 = 12.8 MP decoded). JPEGs larger than that still pass
    when they can be decoded at a reduced scale (see :func:`open_image`'s ``target_size``)."""
    return (input_size * factor) ** 2


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, scaling 16/32-bit greys (PNG ``I;16``/``I``) to 8 bits instead of clipping them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        values = np.array(image, dtype=np.float32)  # 4 bytes a pixel, scaled in place (float32 is exact here)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else float(values.max())
        values *= np.float32(255.0 / top)
        grey = np.clip(np.rint(values, out=values), 0, 255, out=values).astype(np.uint8)
        del values
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def open_image(
    source: str | Path | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    target_size: int | None = None,
    max_aspect: float | None = None,
) -> Image.Image:
    """Decode a JPEG, PNG or WebP image to RGB. Raises DataError naming the file for missing,
    corrupt, truncated, other-format or decompression-bomb input.

    ``max_pixels`` bounds the pixels actually decoded (else ImageTooLarge) and ``max_aspect`` the
    long side over the short side (else ImageTooThin), both checked from the header before
    decoding. With ``target_size`` (an upload for a model of that input size), a JPEG is decoded at
    the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= ``target_size``, and any image
    is then box-reduced by the integer factor that keeps its short side >= ``target_size``: what
    reaches the model's resize has a short side below ``2 * target_size`` and, with ``max_aspect``,
    a long side below ``2 * max_aspect * target_size``."""
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded image")
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise DataError(f"image not found: {source}")
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(raw), formats=DECODERS)
            if target_size and image.format == "JPEG":
                image.draft("RGB", (target_size, target_size))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{label}: image is {width}x{height} pixels, more than the limit of {max_pixels}")
            if max_aspect and max(width, height) > max_aspect * min(width, height):
                raise ImageTooThin(
                    f"{label}: image is {width}x{height} pixels, more elongated than {max_aspect:g}:1 "
                    "(long side over short side); crop it"
                )
            image.load()
        image = _to_rgb(image)
        if target_size and min(image.size) >= 2 * target_size:
            image = image.reduce(min(image.size) // target_size)
        return image
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        raise DataError(f"{label}: not a readable image (JPEG, PNG or WebP expected)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{label}: not a readable image ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{label}: corrupt or truncated image ({exc})") from exc
