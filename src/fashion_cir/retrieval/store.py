"""The vector-store interface every catalog index implements, the ``--store`` spec, and opening an
index folder whatever its store.

Two stores: ``faiss`` (the default; :class:`~fashion_cir.retrieval.index.CatalogIndex`, in-process,
an index folder with atomic swaps) and ``milvus`` (:class:`~fashion_cir.retrieval.milvus_store.MilvusIndex`:
``milvus:PATH.db`` embeds milvus-lite in a local file, ``milvus:http://host:19530`` talks to a Milvus
standalone server or cluster). Either way the index folder holds ``index.json`` (config, model
fingerprint, store), so the fingerprint check and the model defaults work the same."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError, FashionCIRError, ModelError, one_line
from ..io import write_json
from .filters import Filter

if TYPE_CHECKING:
    from ..models.cir import CIRModel

log = logging.getLogger(__name__)


@dataclass
class SearchHit:
    id: str
    score: float
    metadata: dict[str, Any]


@dataclass(frozen=True)
class StoreSpec:
    """A parsed ``--store``: ``kind`` is ``faiss`` or ``milvus``; ``uri`` a milvus-lite file or a server URI."""

    kind: str
    uri: str | None = None

    @property
    def embedded(self) -> bool:
        return self.kind == "milvus" and self.uri is not None and not self.uri.startswith(("http://", "https://", "tcp://", "unix:"))

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "uri": self.uri}


def parse_store_spec(spec: str) -> StoreSpec:
    """``faiss`` | ``milvus:runs/x/milvus.db`` | ``milvus:http://host:19530``; a relative ``.db``
    path is taken from the working directory and recorded absolute."""
    spec = spec.strip()
    if spec == "faiss":
        return StoreSpec("faiss")
    kind, _, uri = spec.partition(":")
    if kind == "milvus" and uri:
        if uri.startswith(("http://", "https://", "tcp://", "unix:")):
            return StoreSpec("milvus", uri)
        if not uri.endswith(".db"):
            raise DataError(f"bad store {spec!r}: a milvus-lite file must end in .db (milvus:runs/x/milvus.db), "
                            "a server is a URI (milvus:http://host:19530)")
        return StoreSpec("milvus", str(Path(uri).resolve()))
    raise DataError(f"unknown store {spec!r}: use faiss, milvus:PATH.db (embedded milvus-lite) or "
                    "milvus:http://host:19530 (a Milvus server or cluster)")


class CatalogStore(ABC):
    """A catalog index: raw image features, metadata and image paths of every item, searchable by
    inner product over the L2-normalised features. ``config`` is the folder's manifest."""

    folder: Path
    config: dict[str, Any]
    ids: list[str]  # every item id (a full scan on a remote store)
    metadata: Mapping[str, dict]  # id -> metadata; ``.get`` works for unknown ids
    paths: Mapping[str, Path]  # id -> image file
    report: dict[str, Any]  # what the last build or add did (counts, failures, seconds)

    # -- reading ---------------------------------------------------------------------------------
    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, image_id: object) -> bool: ...

    @abstractmethod
    def vector(self, image_id: str) -> np.ndarray:
        """The stored row of one item: its raw (unnormalised) image features (``config["feature_dim"]``
        values), then its description features when the index was built with a matcher."""

    @abstractmethod
    def search_vectors(self, queries: np.ndarray, k: int, exclude: Iterable[str] = (),
                       filter: Filter | None = None) -> list[list[SearchHit]]:
        """Top ``k`` items per normalised query among those that match ``filter`` and are not in
        ``exclude``; ``k`` of them whenever that many match."""

    # -- writing ---------------------------------------------------------------------------------
    @abstractmethod
    def add_features(self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict],
                     paths: Mapping[str, Path]) -> None:
        """Insert new items (their ids must not be in the store)."""

    @abstractmethod
    def upsert_features(self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict],
                        paths: Mapping[str, Path]) -> None:
        """Insert items, replacing the features, metadata and path of ids already there."""

    @abstractmethod
    def remove(self, ids: Iterable[str]) -> list[str]:
        """Delete items; returns the ids that were there (and are gone now)."""

    @abstractmethod
    def save(self) -> None:
        """Persist the changes (FAISS: a new data folder and an atomic manifest swap)."""

    def write_manifest(self) -> None:
        """Swap in ``index.json`` atomically, first deleting the temporary manifests of writers killed
        mid-write (callers hold the folder lock, so no other writer's is in flight)."""
        for stale in self.folder.glob(".index.json.*.tmp"):
            stale.unlink(missing_ok=True)
        write_json(self.folder / "index.json", self.config)

    def discard(self) -> None:  # noqa: B027 -- a hook with a no-op default (FAISS), not an abstract method
        """Undo a build that failed before :meth:`save` wrote its manifest (FAISS: nothing to undo)."""

    # -- shared ----------------------------------------------------------------------------------
    @property
    def store_kind(self) -> str:
        return self.config.get("store", {}).get("kind", "faiss")

    @property
    def fields(self) -> list[str]:
        """Metadata fields a filter may name."""
        return list(self.config.get("fields", []))

    @property
    def fingerprint(self) -> str:
        return self.config["image_fingerprint"]

    def check_model(self, model: CIRModel) -> None:
        """Refuse a model whose image encoder is not the one that encoded this catalog."""
        actual = model.backbone.image_fingerprint()
        if actual != self.fingerprint:
            raise ModelError(
                f"index {self.folder} was built with image encoder {self.config['backbone']} (fingerprint "
                f"{self.fingerprint}) but the model given has {model.backbone.spec} (fingerprint {actual}); "
                "use the model the index was built with, or rebuild the index with this model")
        wanted = {"matcher": (model.matcher.config() if model.matcher is not None else {}).get("spec"),
                  "attributes": model.attribute_space.names if model.attribute_space is not None else None}
        built = {"matcher": (self.config.get("matcher") or {}).get("spec"), "attributes": self.config.get("attributes")}
        if wanted != built:
            raise ModelError(f"index {self.folder} holds items for {built} but the model reads {wanted}; use the "
                             "model the index was built with, or rebuild the index")


def row_width(config: Mapping[str, Any]) -> int:
    """Width of an index's stored rows: its blocks (raw image features, then description features
    and attributes where the model reads them; a manifest from before blocks: image + matcher)."""
    if config.get("blocks"):
        return int(sum(config["blocks"].values()))
    return int(config["feature_dim"]) + int((config.get("matcher") or {}).get("dim", 0))


def item_vectors(rows: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """What an index searches for its stored rows: the image block normalised, the other blocks as
    stored (:meth:`~fashion_cir.models.cir.CIRModel.item_vectors`)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    dim = int(config["feature_dim"])
    image = rows[:, :dim] / np.maximum(np.linalg.norm(rows[:, :dim], axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(np.concatenate([image, rows[:, dim:]], axis=1))


def open_index(folder: str | Path, model: CIRModel | None = None) -> CatalogStore:
    """Open an index folder with the store its manifest names; with ``model``, check its fingerprint."""
    from .index import CatalogIndex, read_manifest

    config = read_manifest(folder)
    kind = config.get("store", {}).get("kind", "faiss")
    if kind == "faiss":
        return CatalogIndex.load(folder, model)
    if kind == "milvus":
        from .milvus_store import MilvusIndex

        index = MilvusIndex.open(Path(folder), config)
        if model is not None:
            index.check_model(model)
        return index
    raise DataError(f"{Path(folder) / 'index.json'}: unknown store kind {kind!r}")


def index_model(folder: str | Path, model: CIRModel | str | Path | None = None) -> CIRModel:
    """The model to search an index with: a CIRModel as given, a model folder, a backbone spec, or
    (None) the model the index was built with: its folder when it still exists, else its backbone."""
    from ..models.cir import MODEL_FILE, CIRModel, load_model
    from .index import read_manifest

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
        self._index = open_index(self.folder, model)

    def _manifest_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = (self.folder / "index.json").stat()
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
                raise DataError(f"{self.folder / 'index.json'} is missing")
            self._index = open_index(self.folder, self.model)
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
