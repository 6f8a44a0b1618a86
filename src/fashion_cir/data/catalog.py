"""The clothing catalog: images, coarse labels, split files and per-image MLLM attributes."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io import iter_jsonl_numbered
from .images import scan_images
from .triplets import read_split

SPLITS = ("train", "val", "test")
GET_DATA = (
    "get the images from the public 'clothing-dataset' repository by Alexey Grigorev "
    "(images/, images.csv) and pass --catalog DIR"
)


@dataclass
class ClothingCatalog:
    """Paths and annotations of a clothing catalog; ``attributes`` maps id -> the MLLM record."""

    root: Path
    image_paths: dict[str, Path]
    labels: dict[str, str]
    attributes: dict[str, dict]
    splits: dict[str, list[str]]
    attributes_file: Path | None = None

    def split_paths(self, split: str) -> dict[str, Path]:
        if split not in self.splits:
            raise DataError(f"catalog {self.root} has no split {split!r}; available: {sorted(self.splits)}")
        return {i: self.image_paths[i] for i in self.splits[split] if i in self.image_paths}

    def descriptions(self) -> dict[str, str]:
        return descriptions_of(self.attributes)


def read_attribute_records(path: str | Path) -> dict[str, tuple[int, dict]]:
    """attributes.jsonl as id -> (line number, raw record); a record without an ``image`` id or a
    duplicate id is a DataError naming file and line."""
    records: dict[str, tuple[int, dict]] = {}
    for lineno, record in iter_jsonl_numbered(path, "attributes file"):
        image_id = record.get("image")
        if not isinstance(image_id, str) or not image_id:
            raise DataError(f"malformed attributes file {path}, line {lineno}: expected a non-empty 'image' id")
        if image_id in records:
            raise DataError(
                f"malformed attributes file {path}, line {lineno}: duplicate image id {image_id!r} "
                f"(first on line {records[image_id][0]})"
            )
        records[image_id] = (lineno, record)
    return records


def read_attributes(path: str | Path) -> dict[str, dict]:
    """attributes.jsonl: one object per image with at least ``image`` and ``description``."""
    return {image_id: record for image_id, (_, record) in read_attribute_records(path).items()}


def descriptions_of(records: dict[str, dict]) -> dict[str, str]:
    """id -> description for the attribute records that have a non-empty text description."""
    return {
        i: r["description"] for i, r in records.items() if isinstance(r.get("description"), str) and r["description"]
    }


def read_descriptions(path: str | Path) -> dict[str, str]:
    """id -> MLLM description from an attributes JSONL (the sentence-level prompts' source)."""
    return descriptions_of(read_attributes(path))


def read_labels(path: str | Path) -> dict[str, str]:
    """id -> label from a CSV with ``image`` and ``label`` columns (images.csv)."""
    labels: dict[str, str] = {}
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("image") and row.get("label"):
                labels[row["image"]] = row["label"]
    return labels


def load_clothing_catalog(root: str | Path, attributes: str | Path | None = None) -> ClothingCatalog:
    root = Path(root)
    images = root / "images"
    if not images.is_dir():
        raise DataError(f"clothing catalog not found: {images} does not exist; {GET_DATA}")
    attributes_path = Path(attributes) if attributes is not None else root / "attributes.jsonl"
    if not attributes_path.is_file():
        raise DataError(
            f"attributes file not found: {attributes_path}; run `fashion-cir caption` over the catalog "
            "to create it, or pass --attributes FILE"
        )
    image_paths = scan_images(images)
    labels = read_labels(root / "images.csv") if (root / "images.csv").is_file() else {}
    splits = {
        s: read_split(root / "image_splits" / f"split.clothing.{s}.json")
        for s in SPLITS
        if (root / "image_splits" / f"split.clothing.{s}.json").is_file()
    }
    return ClothingCatalog(root, image_paths, labels, read_attributes(attributes_path), splits, attributes_path)
