"""FashionIQ-format triplets: ``[{"candidate", "target", "captions": [c1, c2], ...}]`` plus an image
split file and an images folder. Reads the real FashionIQ files and any catalog in the same schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import read_json
from .images import check_image_id, find_image

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


@dataclass(frozen=True)
class Triplet:
    """A composed-retrieval example. ``extra`` keeps generator fields (reference_prompt, changes,
    hard_negatives, source) untouched."""

    candidate: str
    target: str | None
    captions: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def reference_prompt(self) -> str | None:
        return self.extra.get("reference_prompt")

    @property
    def hard_negatives(self) -> list[str]:
        return list(self.extra.get("hard_negatives") or [])


@dataclass
class TripletSet:
    """Triplets with their gallery (the split's image ids) and image paths, plus what was missing."""

    name: str
    triplets: list[Triplet]
    gallery_ids: list[str]
    image_paths: dict[str, Path]
    missing_images: list[str]
    skipped_triplets: int
    duplicate_gallery_ids: int = 0

    def report(self) -> dict[str, int]:
        return {
            "triplets": len(self.triplets),
            "gallery_images": len(self.gallery_ids),
            "missing_images": len(self.missing_images),
            "skipped_triplets": self.skipped_triplets,
            "duplicate_gallery_ids": self.duplicate_gallery_ids,
        }


def parse_triplets(raw: Any, source: str, require_target: bool = True) -> list[Triplet]:
    """Validate the FashionIQ caption schema, naming the file, index and field of any problem."""
    if not isinstance(raw, list):
        raise DataError(f"{source}: expected a JSON list of triplets, got {type(raw).__name__}")
    triplets = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise DataError(f"{source}[{index}]: expected an object, got {type(item).__name__}")
        candidate = item.get("candidate")
        target = item.get("target")
        captions = item.get("captions")
        if not isinstance(candidate, str) or not candidate:
            raise DataError(f"{source}[{index}]: field 'candidate' must be a non-empty string, got {candidate!r}")
        if require_target and (not isinstance(target, str) or not target):
            raise DataError(f"{source}[{index}]: field 'target' must be a non-empty string, got {target!r}")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise DataError(
                f"{source}[{index}]: field 'captions' must be a non-empty list of strings, got {captions!r}"
            )
        extra = {k: v for k, v in item.items() if k not in ("candidate", "target", "captions")}
        triplets.append(Triplet(candidate, target, tuple(captions), extra))
    return triplets


def read_split(path: str | Path) -> list[str]:
    raw = read_json(path, "image split file")
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise DataError(f"image split file {path}: expected a JSON list of image id strings")
    return raw


def load_triplet_set(
    captions: str | Path,
    split_file: str | Path | list[str | Path],
    images: str | Path,
    strict: bool = False,
    name: str | None = None,
) -> TripletSet:
    """Read captions + split + images folder. Triplets whose reference or target image is missing
    are skipped and counted (or, with ``strict``, raise). The gallery is the split's images that exist
    (with several split files, their union in order)."""
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"images folder not found: {images}")
    triplets = parse_triplets(read_json(captions, "captions file"), str(captions))
    split_files = split_file if isinstance(split_file, list) else [split_file]
    split_ids = [i for f in split_files for i in read_split(f)]
    unique_ids = list(dict.fromkeys(split_ids))
    for image_id in unique_ids:
        check_image_id(image_id, str(split_file))
    for t in triplets:
        for triplet_image in (t.candidate, t.target):
            if triplet_image:
                check_image_id(triplet_image, str(captions))
    wanted = dict.fromkeys(unique_ids + [i for t in triplets for i in (t.candidate, t.target) if i])
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for image_id in wanted:
        path = find_image(images, image_id)
        if path is None:
            missing.append(image_id)
        else:
            paths[image_id] = path
    if strict and missing:
        raise DataError(
            f"{len(missing)} images referenced by {captions} / {split_file} are missing from {images} "
            f"(first: {missing[:3]}); drop --strict to skip them"
        )
    kept = [t for t in triplets if t.candidate in paths and t.target in paths]
    return TripletSet(
        name=name or Path(captions).stem,
        triplets=kept,
        gallery_ids=[i for i in unique_ids if i in paths],
        image_paths=paths,
        missing_images=missing,
        skipped_triplets=len(triplets) - len(kept),
        duplicate_gallery_ids=len(split_ids) - len(unique_ids),
    )


def fashioniq_files(root: str | Path, category: str, split: str) -> tuple[Path, Path]:
    """Paths of FashionIQ's caption and split files for one category and split."""
    if category not in FASHIONIQ_CATEGORIES:
        raise DataError(f"unknown FashionIQ category {category!r}; expected one of {FASHIONIQ_CATEGORIES}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"FashionIQ folder not found: {root} (expected captions/ and image_splits/ inside)")
    return root / "captions" / f"cap.{category}.{split}.json", root / "image_splits" / f"split.{category}.{split}.json"


def load_fashioniq(
    root: str | Path,
    split: str = "val",
    categories: tuple[str, ...] = FASHIONIQ_CATEGORIES,
    images: str | Path | None = None,
    strict: bool = False,
) -> dict[str, TripletSet]:
    """FashionIQ per category. ``images`` defaults to ``root/images``; it may hold some or none."""
    root = Path(root)
    image_dir = Path(images) if images is not None else root / "images"
    if not image_dir.is_dir():
        raise DataError(
            f"FashionIQ images folder not found: {image_dir}. FashionIQ images are not redistributed; "
            "download what is still available and pass --images DIR"
        )
    return {
        category: load_triplet_set(*fashioniq_files(root, category, split), image_dir, strict=strict, name=category)
        for category in categories
    }
