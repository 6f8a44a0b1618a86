"""An index folder, whatever its store: open it with the store its manifest names, the model to
search it with, and :class:`LiveIndex`, which follows the folder for a long-running service."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from ..errors import DataError, FashionCIRError, one_line
from ..models.cir import MODEL_FILE, CIRModel, load_model
from .faiss_store import DATA_FILES, CatalogIndex
from .manifest import INDEX_FILE, read_manifest
from .milvus_store import MilvusIndex
from .store import CatalogStore, row_width

log = logging.getLogger(__name__)


def open_index(folder: str | Path, model: CIRModel | None = None, read_only: bool = False) -> CatalogStore:
    """Open an index folder with the store its manifest names; with ``model``, check its fingerprint.
    ``read_only``: a reader, which memory-maps a FAISS index whose manifest says ``mmap``."""
    config = read_manifest(folder)
    kind = config.get("store", {}).get("kind", "faiss")
    if kind == "faiss":
        return CatalogIndex.load(folder, model, read_only)
    if kind == "milvus":
        index = MilvusIndex.open(Path(folder), config)
        if model is not None:
            index.check_model(model)
        return index
    raise DataError(f"{Path(folder) / INDEX_FILE}: unknown store kind {kind!r}")


def index_model(folder: str | Path, model: CIRModel | str | Path | None = None) -> CIRModel:
    """The model to search an index with: a CIRModel as given, a model folder, a backbone spec, or
    (None) the model the index was built with: its folder when it still exists, else its backbone."""
    if isinstance(model, CIRModel):
        return model.eval()
    if model is None:
        manifest = read_manifest(folder)
        model_dir = manifest.get("model_dir")
        if model_dir and (Path(model_dir) / MODEL_FILE).is_file():
            return load_model(model_dir=model_dir)
        return load_model(backbone=manifest["backbone"])
    if (Path(model) / MODEL_FILE).is_file():
        return load_model(model_dir=model)
    return load_model(backbone=str(model))


class LiveIndex:
    """An open index that follows its folder, for a long-running service: a FAISS index is
    reopened when its manifest changes (``index add/upsert/remove`` swap it atomically); a Milvus
    index is live already. When the changed folder cannot be opened, the last good version keeps
    answering and :attr:`problem` says why (logged once per change). Attribute access goes to the
    current index; take :meth:`current` once per request for a consistent view."""

    def __init__(self, folder: str | Path, model: CIRModel | None = None):
        self.folder = Path(folder)
        self.model = model
        self.problem: str | None = None
        self._lock = threading.Lock()
        self._stamp = self._manifest_stamp()
        self._index = open_index(self.folder, model, read_only=True)

    def _manifest_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = (self.folder / INDEX_FILE).stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def current(self) -> CatalogStore:
        if self._index.store_kind == "faiss":
            stamp = self._manifest_stamp()
            if stamp != self._stamp:
                with self._lock:
                    if stamp != self._stamp:
                        self._reopen(stamp)
        return self._index

    def _reopen(self, stamp: tuple[int, int, int] | None) -> None:
        """Open the changed folder (under the lock); the stamp moves last, so that a request that
        sees it also sees the new index or the new problem."""
        try:
            if stamp is None:
                raise DataError(f"{self.folder / INDEX_FILE} is missing")
            self._index = open_index(self.folder, self.model, read_only=True)
            self.problem = None
        except Exception as exc:  # whatever is wrong with the new version, the last good one still answers
            self.problem = f"the index changed but cannot be opened, the previous version is served: {one_line(exc)}"
            log.error("%s", self.problem, exc_info=None if isinstance(exc, FashionCIRError) else exc)
        self._stamp = stamp

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current(), name)

    def __len__(self) -> int:
        return len(self.current())

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.current()


def index_info(folder: str | Path) -> dict[str, Any]:
    """What an index folder holds and needs: store, factory, items, row width, two-stage setting
    and (FAISS) the bytes on disk of the searched vectors (``faiss.index``) and of the stored
    float32 rows a second stage re-scores (``features.npy``), and whether readers map them."""
    config = read_manifest(folder)
    info: dict[str, Any] = {
        "store": config.get("store", {"kind": "faiss"}),
        "factory": config["factory"],
        "count": config["count"],
        "blocks": config.get("blocks") or {"image": config["feature_dim"]},
        "row_width": row_width(config),
        "candidates": config.get("candidates"),
        "mmap": bool(config.get("mmap")),
    }
    if info["store"].get("kind", "faiss") == "faiss":
        data = Path(folder) / config["data"]
        sizes = {name: (data / name).stat().st_size for name in DATA_FILES if (data / name).is_file()}
        info["files"] = {f"{config['data']}/{name}": size for name, size in sizes.items()}
        mapped = sizes.get("faiss.index", 0) + sizes.get("features.npy", 0)
        info["vectors_bytes"] = sizes.get("faiss.index", 0)
        info["rows_bytes"] = sizes.get("features.npy", 0)
        # ids, metadata and paths are read into memory either way (Python objects: several times their JSON)
        info["read_into_memory_bytes"] = sum(sizes.values()) - (mapped if info["mmap"] else 0)
    return info
