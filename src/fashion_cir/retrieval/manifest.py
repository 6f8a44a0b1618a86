"""``index.json``, the manifest of an index folder: config, model fingerprint, counts, the catalog
root and (FAISS) the current data folder. :class:`IndexManifest` types the fields every index has;
:func:`read_manifest` checks a folder's manifest against it and turns the first problem into a
one-line DataError naming the file and the field. The stores keep the manifest as the plain dict it
was read as (other fields: matcher, attributes, model_dir, versions, ... pass through unchanged)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import DataError
from ..io import read_json
from .filters import FIELD_PATTERN

INDEX_FILE = "index.json"
FORMAT = "fashion-cir-index/1"
DATA_NAME = re.compile(r"data-\d{6,}")
REBUILD = "; rebuild the index"


def _filesystem_root(folder: str) -> bool:
    return os.path.normpath(folder).strip(os.sep) == ""


def catalog_root(paths: Iterable[str | Path], root: str | None = None) -> str:
    """The deepest folder holding every image (and the current ``root``, when given); DataError
    when that is the filesystem root (the service serves images from inside the root only)."""
    folders = sorted({str(Path(p).resolve().parent) for p in paths} | ({root} if root else set()))
    common = os.path.commonpath(folders) if folders else os.sep
    if _filesystem_root(common):
        raise DataError(
            f"the catalog images share no folder below the filesystem root ({' and '.join(folders[:2])}); "
            "keep a catalog's images under one folder"
        )
    return common


class IndexManifest(BaseModel):
    """The checked fields of ``index.json`` (strict types: no bool for an int, no number for a text).
    ``data`` is required of a FAISS index only; a Milvus store checks its ``store`` fields when it opens."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: Literal["fashion-cir-index/1"]
    store: dict[str, Any] = Field(default_factory=lambda: {"kind": "faiss"})
    feature_dim: int = Field(ge=1)
    backbone: str
    image_fingerprint: str
    root: str
    count: int = Field(ge=0)
    nprobe: int = Field(ge=1)
    ef_search: int = Field(ge=1)
    factory: str
    data: Any = None  # str, checked below for a FAISS index only
    fields: list[str] = Field(default_factory=list)
    blocks: dict[str, int] | None = None
    candidates: int | None = Field(None, ge=1)  # two-stage search by default (retrieval/rescore.py)
    mmap: bool = False  # readers memory-map the FAISS index and the stored rows

    @property
    def store_kind(self) -> str:
        return self.store.get("kind", "faiss")

    @field_validator("store")
    @classmethod
    def _store_names_its_kind(cls, store: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(store.get("kind", "faiss"), str):
            raise ValueError(_MESSAGES["store"])
        return store

    @field_validator("root")
    @classmethod
    def _root_is_an_absolute_folder(cls, root: str) -> str:
        if not os.path.isabs(root) or _filesystem_root(root):
            raise ValueError(f"field 'root' must be the absolute folder of the catalog images, not {root!r}{REBUILD}")
        return root

    @field_validator("fields")
    @classmethod
    def _fields_are_identifiers(cls, fields: list[str]) -> list[str]:
        if not all(FIELD_PATTERN.match(f) for f in fields):
            raise ValueError(_MESSAGES["fields"])
        return fields

    @model_validator(mode="after")
    def _faiss_data_and_blocks(self) -> IndexManifest:
        if self.store_kind == "faiss":
            if not isinstance(self.data, str):
                raise ValueError(f"field 'data' must be str, got {self.data!r}{REBUILD}")
            if not DATA_NAME.fullmatch(self.data):
                raise ValueError(f"field 'data' must name a data-NNNNNN folder inside the index, got {self.data!r}")
        if self.blocks is not None and not (
            self.blocks.get("image") == self.feature_dim and all(v > 0 for v in self.blocks.values())
        ):
            raise ValueError(_MESSAGES["blocks"])
        return self


# the one-line message per field when its value has the wrong shape (types are named by _TYPED;
# between them every field but format and data, which have messages of their own)
_MESSAGES = {
    "store": f"field 'store' must be an object naming its kind{REBUILD}",
    "fields": f"field 'fields' must list metadata field names (identifiers){REBUILD}",
    "blocks": f"field 'blocks' must map block names to widths, the image block's being feature_dim{REBUILD}",
}
_TYPED = {
    "feature_dim": "int",
    "backbone": "str",
    "image_fingerprint": "str",
    "root": "str",
    "count": "int",
    "nprobe": "int",
    "ef_search": "int",
    "factory": "str",
    "candidates": "a positive int or null",
    "mmap": "true or false",
}
_POSITIVE = f"count, feature_dim, nprobe and ef_search must be positive{REBUILD}"


def _problem(error: ValidationError, config: dict[str, Any]) -> str:
    """The first problem pydantic found, as the one line the hand-written checks used to give."""
    first = error.errors()[0]
    if first["type"] == "value_error":  # one of the validators above: its own message
        return str(first["ctx"]["error"])
    field = str(first["loc"][0])  # a field's own error (the model's checks are value errors, above)
    if field == "format":
        return f"unsupported format {config.get('format')!r} (expected {FORMAT})"
    if field in _MESSAGES:
        return _MESSAGES[field]
    if first["type"] == "greater_than_equal":
        return f"field 'candidates' must be {_TYPED['candidates']}{REBUILD}" if field == "candidates" else _POSITIVE
    value = config.get(field)
    hint = "; it was written by an older fashion-cir, rebuild it with --overwrite" if field == "root" else REBUILD
    return f"field {field!r} must be {_TYPED[field]}, got {value!r}{hint}"


def check_manifest(config: Any, path: str | Path) -> IndexManifest:
    """``config`` (a parsed ``index.json``) as an :class:`IndexManifest`; DataError naming ``path``
    and the first bad field otherwise."""
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(config).__name__}")
    try:
        return IndexManifest.model_validate(config)
    except ValidationError as exc:
        raise DataError(f"{path}: {_problem(exc, config)}") from None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``index.json`` of an index folder (config, fingerprint, backbone spec, counts), checked
    by :class:`IndexManifest`; returned as the dict it was read as."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise DataError(
            f"not a fashion-cir index folder (no {INDEX_FILE}): {folder}; build one with `fashion-cir index build`"
        )
    config = read_json(path, "index manifest")
    check_manifest(config, path)
    return config
