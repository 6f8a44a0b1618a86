"""Building and updating an index folder: encode a catalog's images (through the feature cache),
add the rows an index stores, and save; add, upsert and remove items later. Writers hold a lock on
the folder. The stores themselves: :mod:`~fashion_cir.retrieval.faiss_store` and
:mod:`~fashion_cir.retrieval.milvus_store`; the manifest: :mod:`~fashion_cir.retrieval.manifest`."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..data.images import check_image_id
from ..data.metadata import load_catalog
from ..errors import DEFAULT_MAX_FAILED_SHARE, DataError, check_failures
from ..features.cache import FeatureCache
from ..io import environment_info, folder_lock
from ..models.cir import CIRModel
from .faiss_store import DEFAULT_FACTORY, CatalogIndex, resolve_factory
from .filters import filterable_fields
from .folder import open_index
from .manifest import FORMAT, INDEX_FILE, catalog_root, read_manifest
from .milvus_store import MilvusIndex
from .policy import item_parts
from .store import CatalogStore, StoreSpec, parse_store_spec


def _encode(
    model: CIRModel, paths: dict[str, Path], cache_dir: Path, batch_size: int, num_workers: int, progress: bool
) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    cache = FeatureCache(cache_dir)
    ids, features = cache.encode(
        model.backbone, paths, batch_size=batch_size, num_workers=num_workers, on_error="skip", progress=progress
    )
    stats = cache.last_stats
    encoded = set(ids)
    failures = {i: stats.errors.get(i, "not encoded") for i in paths if i not in encoded}
    return (
        ids,
        features,
        {
            "requested": stats.requested,
            "computed": stats.computed,
            "reused": stats.reused,
            "failed": len(failures),
            "failures": failures,
            "encode_seconds": round(stats.seconds, 3),
        },
    )


def _stored_rows(
    model: CIRModel, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict], cache_dir: Path
) -> np.ndarray:
    """The rows an index stores (see :func:`~fashion_cir.retrieval.store.item_vectors`): raw image
    features, then the item's description features and attributes where the model reads them."""
    parts = [p.numpy() for p in item_parts(model, ids, metadata, cache_dir) if p is not None]
    return np.concatenate([features.astype(np.float32), *parts], axis=1) if parts else features


def build_index(
    folder: str | Path,
    model: CIRModel,
    images: str | Path | Mapping[str, str | Path],
    metadata: str | Path | Iterable[str | Path] | Mapping[str, dict] | None = None,
    *,
    ids: Iterable[str] | None = None,
    factory: str = DEFAULT_FACTORY,
    nprobe: int = 64,
    ef_search: int = 64,
    candidates: int | None = None,
    mmap: bool = False,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    store: str | StoreSpec = "faiss",
    milvus: Mapping[str, Any] | None = None,
    max_failed_share: float = DEFAULT_MAX_FAILED_SHARE,
) -> CatalogStore:
    """Encode a catalog with ``model`` and write a new index folder.

    Images that cannot be decoded are left out and listed with their reasons in
    ``index.report["failures"]``; when all of them, or more than ``max_failed_share``, fail, nothing
    is written and DataError names the first reasons. Encoding goes through a feature cache
    (default ``folder/feature-cache``), so an interrupted build resumes.
    ``factory`` is a FAISS factory string (``SQ8`` / ``SQfp16`` / ``IVF1024,SQ8``: int8 or float16
    codes); ``nprobe`` / ``ef_search`` tune IVF / HNSW searches. ``candidates`` makes searches
    two-stage by default (the store finds that many, the exact fused score from the stored rows
    orders them); ``mmap``: readers map the FAISS index and the rows from disk.
    ``store`` is ``faiss`` or a Milvus spec (``milvus:PATH.db``, ``milvus:http://host:19530``);
    ``milvus`` holds its options (``collection``, ``index_type``, ``index_params``)."""
    folder = Path(folder)
    spec = parse_store_spec(store) if isinstance(store, str) else store
    if candidates is not None and candidates < 1:
        raise DataError(f"candidates must be a positive number of items (or None: one-stage search), got {candidates}")
    with folder_lock(folder):
        if (folder / INDEX_FILE).exists() and not overwrite:
            raise DataError(
                f"an index already exists in {folder}; add images with `fashion-cir index add`, "
                "or rebuild with --overwrite"
            )
        paths, meta = load_catalog(images, metadata, ids)
        encoded, features, report = _encode(
            model, paths, Path(cache_dir or folder / "feature-cache"), batch_size, num_workers, progress
        )
        check_failures(report["failures"], len(paths), max_failed_share, "catalog images")
        start = time.perf_counter()
        rows = _stored_rows(model, encoded, features, meta, Path(cache_dir or folder / "feature-cache"))
        backbone = model.backbone
        factory = resolve_factory(factory, len(encoded))
        config = {
            "format": FORMAT,
            "store": spec.to_config(),
            "fields": filterable_fields(meta.values()),
            "factory": factory,
            "metric": "inner_product",
            "feature_dim": int(features.shape[1]),
            "matcher": model.matcher.config() if model.matcher is not None else None,
            "attributes": model.attribute_space.names if model.attribute_space is not None else None,
            "blocks": model.block_dims(),
            "nprobe": nprobe,
            "ef_search": ef_search,
            "candidates": candidates,
            "mmap": mmap,
            "backbone": backbone.spec,
            "model_dir": str(model.source) if model.source else None,
            "preprocess": backbone.preprocess_description,
            "image_fingerprint": backbone.image_fingerprint(),
            "count": 0,
            "data": None,
            "root": catalog_root(paths[i] for i in encoded),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": environment_info(),
        }
        if spec.kind == "milvus":
            index: CatalogStore = MilvusIndex.create(folder, config, dict(milvus or {}), overwrite=overwrite)
        else:
            index = CatalogIndex.create(folder, config, rows)
        try:
            index.add_features(encoded, rows, meta, paths)
            index.save()
        except BaseException:
            index.discard()
            raise
    index.report = {**report, "added": len(encoded), "index_seconds": round(time.perf_counter() - start, 3)}
    return index


def add_to_index(
    folder: str | Path,
    model: CIRModel,
    images: str | Path | Mapping[str, str | Path],
    metadata: str | Path | Iterable[str | Path] | Mapping[str, dict] | None = None,
    *,
    replace: bool = False,
    ids: Iterable[str] | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    max_failed_share: float = DEFAULT_MAX_FAILED_SHARE,
) -> CatalogStore:
    """Add catalog images to an index: the ids not in it yet (only those are encoded), or with
    ``replace`` every given image, whose features, metadata and path then replace the stored ones
    (the feature cache, keyed by file content, reuses unchanged images). Refuses a model whose
    image fingerprint differs from the index's. Concurrent writers take turns (a lock on the
    folder), so none loses the other's items."""
    read_manifest(folder)
    with folder_lock(folder):
        index = open_index(folder, model)
        paths, meta = load_catalog(images, metadata, ids)
        todo = paths if replace else {i: p for i, p in paths.items() if i not in index}
        report: dict[str, Any] = {"requested": len(paths), "computed": 0, "reused": 0, "failed": 0, "failures": {}}
        encoded: list[str] = []
        replaced = 0
        if todo:
            cache = Path(cache_dir or index.folder / "feature-cache")
            encoded, features, report = _encode(model, todo, cache, batch_size, num_workers, progress)
            check_failures(
                report["failures"], len(todo), max_failed_share, "catalog images" if replace else "new catalog images"
            )
            index.config["root"] = catalog_root((todo[i] for i in encoded), index.config.get("root"))
            replaced = sum(1 for i in encoded if i in index)
            write = index.upsert_features if replace else index.add_features
            write(encoded, _stored_rows(model, encoded, features, meta, cache), meta, todo)
            index.save()
    if replace:
        index.report = {**report, "replaced": replaced, "added": len(encoded) - replaced}
    else:
        index.report = {
            **report,
            "requested": len(paths),
            "already_indexed": len(paths) - len(todo),
            "added": report["computed"] + report["reused"],
        }
    return index


def remove_from_index(folder: str | Path, ids: Iterable[str]) -> tuple[CatalogStore, list[str], list[str]]:
    """Delete items by id; returns (index, removed ids, ids that were not in the index)."""
    wanted = [check_image_id(i) for i in dict.fromkeys(str(i) for i in ids)]
    if not wanted:
        raise DataError("no ids to remove")
    read_manifest(folder)
    with folder_lock(folder):
        index = open_index(folder)
        removed = index.remove(wanted)
        if removed:
            index.save()
    gone = set(removed)
    return index, removed, [i for i in wanted if i not in gone]
