"""The vector-store interface every catalog index implements, the ``--store`` spec, and the rows a
store keeps and searches (opening a folder whatever its store: :mod:`~fashion_cir.retrieval.folder`).

Two stores: ``faiss`` (the default; :class:`~fashion_cir.retrieval.faiss_store.CatalogIndex`, in-process,
an index folder with atomic swaps) and ``milvus`` (:class:`~fashion_cir.retrieval.milvus_store.MilvusIndex`:
``milvus:PATH.db`` embeds milvus-lite in a local file, ``milvus:http://host:19530`` talks to a Milvus
standalone server or cluster). Either way the index folder holds ``index.json`` (config, model
fingerprint, store), so the fingerprint check and the model defaults work the same."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError, ModelError
from ..io import write_json
from .filters import Filter

if TYPE_CHECKING:
    from ..models.cir import CIRModel


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
        return (
            self.kind == "milvus"
            and self.uri is not None
            and not self.uri.startswith(("http://", "https://", "tcp://", "unix:"))
        )

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
            raise DataError(
                f"bad store {spec!r}: a milvus-lite file must end in .db (milvus:runs/x/milvus.db), "
                "a server is a URI (milvus:http://host:19530)"
            )
        return StoreSpec("milvus", str(Path(uri).resolve()))
    raise DataError(
        f"unknown store {spec!r}: use faiss, milvus:PATH.db (embedded milvus-lite) or "
        "milvus:http://host:19530 (a Milvus server or cluster)"
    )


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
    def stored_rows(self, ids: list[str]) -> np.ndarray:
        """The stored rows of these items [len(ids), width] (float32): what a second stage re-scores."""

    @abstractmethod
    def search_vectors(
        self, queries: np.ndarray, k: int, exclude: Iterable[str] = (), filter: Filter | None = None
    ) -> list[list[SearchHit]]:
        """Top ``k`` items per normalised query among those that match ``filter`` and are not in
        ``exclude``; ``k`` of them whenever that many match."""

    # -- writing ---------------------------------------------------------------------------------
    @abstractmethod
    def add_features(
        self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict], paths: Mapping[str, Path]
    ) -> None:
        """Insert new items (their ids must not be in the store)."""

    @abstractmethod
    def upsert_features(
        self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict], paths: Mapping[str, Path]
    ) -> None:
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
                "use the model the index was built with, or rebuild the index with this model"
            )
        wanted = {
            "matcher": (model.matcher.config() if model.matcher is not None else {}).get("spec"),
            "attributes": model.attribute_space.names if model.attribute_space is not None else None,
        }
        built = {"matcher": (self.config.get("matcher") or {}).get("spec"), "attributes": self.config.get("attributes")}
        if wanted != built:
            raise ModelError(
                f"index {self.folder} holds items for {built} but the model reads {wanted}; use the "
                "model the index was built with, or rebuild the index"
            )


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
