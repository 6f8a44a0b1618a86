"""A catalog to index: image files (a folder or an id -> path map) and per-item metadata files
(CSV, JSONL or JSON), merged into (id -> path, id -> metadata)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import DataError
from ..io import iter_jsonl, read_json
from .images import IMAGE_EXTENSIONS, check_image_id, scan_images


def read_metadata(path: str | Path) -> dict[str, dict]:
    """Per-item metadata from a CSV (``image`` or ``id`` column), a JSONL file (one record per
    line with ``image`` or ``id``) or a JSON file (a list of such records, or an id -> record map)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metadata file not found: {path}")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            records: Iterable[dict] = list(csv.DictReader(handle))
    elif path.suffix.lower() == ".jsonl":
        records = list(iter_jsonl(path, "metadata file"))
    elif path.suffix.lower() == ".json":
        raw = read_json(path, "metadata file")
        if isinstance(raw, dict):
            return {str(k): dict(v) for k, v in raw.items() if isinstance(v, dict)}
        if not isinstance(raw, list):
            raise DataError(f"metadata file {path}: expected a list of records or an id -> record object")
        records = [r for r in raw if isinstance(r, dict)]
    else:
        raise DataError(f"metadata file {path}: unsupported type {path.suffix!r}; use .csv, .jsonl or .json")
    out: dict[str, dict] = {}
    for number, record in enumerate(records, 1):
        key = record.get("image", record.get("id"))
        if key in (None, ""):
            raise DataError(f"metadata file {path}, record {number}: no 'image' or 'id' field")
        out[str(key)] = {k: v for k, v in record.items() if k not in ("image", "id")}
    return out


def load_catalog(
    images: str | Path | Mapping[str, str | Path],
    metadata: str | Path | Iterable[str | Path] | Mapping[str, dict] | None = None,
    ids: Iterable[str] | None = None,
) -> tuple[dict[str, Path], dict[str, dict]]:
    """Resolve a catalog to (id -> image path, id -> metadata).

    ``images`` is a folder (ids are file stems of .jpg/.jpeg/.png/.webp files) or an id -> path map;
    ``metadata`` one or more metadata files (merged, later files win per field) or an id -> record
    map; ``ids`` restricts the catalog to those ids (e.g. a split file's list)."""
    if isinstance(images, Mapping):
        paths = {check_image_id(str(k), "catalog"): Path(v) for k, v in images.items()}
    else:
        folder = Path(images)
        if not folder.is_dir():
            raise DataError(f"catalog image folder not found: {folder}")
        paths = scan_images(folder)
        if not paths:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
        for image_id, path in paths.items():
            check_image_id(image_id, str(path))
    if ids is not None:
        wanted = list(dict.fromkeys(str(i) for i in ids))
        unknown = [i for i in wanted if i not in paths]
        if unknown:
            raise DataError(f"{len(unknown)} requested ids have no image, first: {unknown[0]!r}")
        paths = {i: paths[i] for i in wanted}
    merged: dict[str, dict] = {}
    if isinstance(metadata, Mapping):
        merged = {str(k): dict(v) for k, v in metadata.items()}
    elif metadata is not None:
        for file in [metadata] if isinstance(metadata, (str, Path)) else metadata:
            for key, record in read_metadata(file).items():
                merged.setdefault(key, {}).update(record)
    return paths, {i: merged.get(i, {}) for i in paths}
