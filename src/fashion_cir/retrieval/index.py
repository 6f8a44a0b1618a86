"""A searchable catalog: image features of every catalog item in a FAISS inner-product index,
plus ids, metadata, image paths and the fingerprint of the model that encoded them.

Folder layout: ``index.json`` (manifest: config, fingerprint, counts, current data folder) and
``data-NNNNNN/`` (``ids.json``, ``metadata.json``, ``paths.json``, ``features.npy`` raw float32
image features, ``faiss.index`` over the L2-normalised features). Every save writes a new data
folder and then swaps the manifest atomically, so a crash leaves the previous index intact; writers
(build, add, upsert, remove) hold a lock on the folder. Image paths are stored relative to the
catalog root the manifest records, and loading refuses any path outside it; a corrupt folder is a
one-line DataError naming the file."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image

from ..data.images import check_image_id
from ..data.metadata import load_catalog
from ..errors import DataError, ModelError, check_failures
from ..features.cache import FeatureCache
from ..io import environment_info, folder_lock, fsync_dir, fsync_file, read_json
from ..models.cir import CIRModel
from .dense import DenseGallery
from .filters import FIELD_PATTERN, Filter, field_text, filterable_fields
from .policy import item_parts
from .store import CatalogStore, SearchHit, StoreSpec, item_vectors, open_index, parse_store_spec, row_width

INDEX_FILE = "index.json"
FORMAT = "fashion-cir-index/1"
DEFAULT_FACTORY = "auto"
AUTO_EXACT_BELOW = 200_000  # BENCHMARKS.md, ANN section: exact search stays fast enough below this
DATA_FILES = ("ids.json", "metadata.json", "paths.json", "features.npy", "faiss.index")
DATA_NAME = re.compile(r"data-\d{6,}")
DEFAULT_MAX_FAILED_SHARE = 0.2
MANIFEST_FIELDS = {"feature_dim": int, "backbone": str, "image_fingerprint": str, "root": str,
                   "count": int, "nprobe": int, "ef_search": int, "factory": str}  # of any index
FAISS_FIELDS = {"data": str}


# -- FAISS helpers ------------------------------------------------------------------------------
def resolve_factory(factory: str, count: int) -> str:
    """``auto``: exact (``Flat``) below :data:`AUTO_EXACT_BELOW` items, else ``IVF<4 sqrt(N)>,Flat``
    (lists rounded to a power of two); any other factory string is returned as it is."""
    if factory != "auto":
        return factory
    if count < AUTO_EXACT_BELOW:
        return "Flat"
    return f"IVF{2 ** round(np.log2(4 * np.sqrt(count)))},Flat"


def _new_faiss_index(factory: str, vectors: np.ndarray) -> faiss.Index:
    """An inner-product index from a FAISS factory string, trained on ``vectors`` when it needs it."""
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise DataError(f"bad FAISS factory string {factory!r} (e.g. 'Flat', 'IVF256,Flat', 'HNSW32'): "
                        f"{str(exc).strip().splitlines()[-1]}") from exc
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and len(vectors) < ivf.nlist:
            raise DataError(f"index {factory!r} has {ivf.nlist} lists but the catalog has only {len(vectors)} "
                            f"images to train them; use fewer lists (about sqrt(N), e.g. 'IVF{max(1, int(len(vectors) ** 0.5))},Flat') or 'Flat'")
        try:
            index.train(vectors)
        except RuntimeError as exc:
            raise DataError(f"could not train FAISS index {factory!r} on {len(vectors)} vectors: {exc}") from exc
    return index


def _set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
    inner = faiss.downcast_index(index)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = ef_search


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``index.json`` of an index folder (config, fingerprint, backbone spec, counts)."""
    folder = Path(folder)
    if not (folder / INDEX_FILE).is_file():
        raise DataError(f"not a fashion-cir index folder (no {INDEX_FILE}): {folder}; build one with `fashion-cir index build`")
    path = folder / INDEX_FILE
    config = read_json(path, "index manifest")
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise DataError(f"{path}: unsupported format {config.get('format')!r} (expected {FORMAT})")
    store = config.get("store", {"kind": "faiss"})
    if not isinstance(store, dict) or not isinstance(store.get("kind", "faiss"), str):
        raise DataError(f"{path}: field 'store' must be an object naming its kind; rebuild the index")
    faiss_index = store.get("kind", "faiss") == "faiss"  # the Milvus store checks its own fields when it opens
    for key, kind in {**MANIFEST_FIELDS, **(FAISS_FIELDS if faiss_index else {})}.items():
        value = config.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            hint = "; it was written by an older fashion-cir, rebuild it with --overwrite" if key == "root" else "; rebuild the index"
            raise DataError(f"{path}: field {key!r} must be {kind.__name__}, got {value!r}{hint}")
    if not os.path.isabs(config["root"]) or _filesystem_root(config["root"]):
        raise DataError(f"{path}: field 'root' must be the absolute folder of the catalog images, not "
                        f"{config['root']!r}; rebuild the index")
    fields = config.get("fields", [])
    if not isinstance(fields, list) or not all(isinstance(f, str) and FIELD_PATTERN.match(f) for f in fields):
        raise DataError(f"{path}: field 'fields' must list metadata field names (identifiers); rebuild the index")
    if faiss_index and not DATA_NAME.fullmatch(config["data"]):
        raise DataError(f"{path}: field 'data' must name a data-NNNNNN folder inside the index, got {config['data']!r}")
    if config["count"] < 0 or config["feature_dim"] < 1 or config["nprobe"] < 1 or config["ef_search"] < 1:
        raise DataError(f"{path}: count, feature_dim, nprobe and ef_search must be positive; rebuild the index")
    blocks = config.get("blocks")
    if blocks is not None and not (isinstance(blocks, dict) and blocks.get("image") == config["feature_dim"] and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in blocks.values())):
        raise DataError(f"{path}: field 'blocks' must map block names to widths, the image block's being "
                        f"feature_dim; rebuild the index")
    return config


def _filesystem_root(folder: str) -> bool:
    return os.path.normpath(folder).strip(os.sep) == ""


def _within(path: str, root: str) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return os.path.commonpath([path, root]) == root


def catalog_root(paths: Iterable[str | Path], root: str | None = None) -> str:
    """The deepest folder holding every image (and the current ``root``, when given); DataError
    when that is the filesystem root (the service serves images from inside the root only)."""
    folders = sorted({str(Path(p).resolve().parent) for p in paths} | ({root} if root else set()))
    common = os.path.commonpath(folders) if folders else os.sep
    if _filesystem_root(common):
        raise DataError(f"the catalog images share no folder below the filesystem root ({' and '.join(folders[:2])}); "
                        "keep a catalog's images under one folder")
    return common


def _read_data_json(path: Path, what: str, kind: type) -> Any:
    value = read_json(path, what)
    if not isinstance(value, kind):
        raise DataError(f"{path}: expected a JSON {'list' if kind is list else 'object'}, got {type(value).__name__}; rebuild the index")
    return value


def _load_features(path: Path, count: int, dim: int) -> np.ndarray:
    try:
        features = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"corrupt feature file {path}: {reason}; rebuild the index") from exc
    if not isinstance(features, np.ndarray) or features.dtype.kind != "f" or features.shape != (count, dim):
        raise DataError(f"{path}: expected {count} x {dim} float features, got shape {getattr(features, 'shape', None)} "
                        f"({getattr(features, 'dtype', '?')}); rebuild the index")
    return features.astype(np.float32, copy=False)


def _search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """FAISS search parameters restricting a search to ``selector``'s rows, keeping nprobe/efSearch."""
    # faiss's stubs lack the keyword constructors its Python wrapper adds (which also keep ``selector``
    # alive with the parameters, in every faiss version) and SearchParametersHNSW
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)  # type: ignore[call-arg]
    inner = faiss.downcast_index(index)
    if hasattr(inner, "hnsw"):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)  # type: ignore[attr-defined]
    return faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]


class CatalogIndex(CatalogStore):
    """The FAISS store: an index folder loaded into memory. Build one with :func:`build_index`, open
    one with :meth:`CatalogIndex.load`; ``ids[row]`` names FAISS row ``row``. Removing or replacing
    items re-adds the kept vectors to the (already trained) FAISS index, so rows stay dense."""

    metadata: dict[str, dict]  # the base's read-only mappings, held (and changed) in memory here
    paths: dict[str, Path]

    def __init__(self, folder: Path, config: dict[str, Any], ids: list[str], metadata: dict[str, dict],
                 paths: dict[str, Path], features: np.ndarray, faiss_index: faiss.Index):
        self.folder = Path(folder)
        self.config = config
        self.ids = ids
        self.metadata = metadata
        self.paths = paths
        self.features = features
        self.faiss_index = faiss_index
        self.rows = {image_id: row for row, image_id in enumerate(ids)}
        self.report: dict[str, Any] = {}
        self._columns: dict[str, np.ndarray] | None = None
        self.config.setdefault("fields", filterable_fields(metadata.values()))
        _set_search_params(faiss_index, config["nprobe"], config["ef_search"])

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.rows

    def vector(self, image_id: str) -> np.ndarray:
        return self.features[self.rows[image_id]]

    @classmethod
    def load(cls, folder: str | Path, model: CIRModel | None = None) -> CatalogIndex:
        """Open an index folder; with ``model``, refuse it unless its image fingerprint matches."""
        folder = Path(folder)
        config = read_manifest(folder)
        if config.get("store", {}).get("kind", "faiss") != "faiss":
            raise DataError(f"{folder / INDEX_FILE}: a {config['store'].get('kind')!r} index; open it with open_index")
        data = folder / config["data"]
        missing = [name for name in DATA_FILES if not (data / name).is_file()]
        if missing:
            raise DataError(f"index {folder} is incomplete: {data} lacks {missing}; rebuild it")
        count, dim, root = config["count"], config["feature_dim"], config["root"]
        ids = _read_data_json(data / "ids.json", "index ids", list)
        if len(ids) != count or not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
            raise DataError(f"{data / 'ids.json'}: expected {count} distinct id strings (the manifest's count), "
                            f"got {len(ids)} entries; rebuild the index")
        raw_paths = _read_data_json(data / "paths.json", "index paths", dict)
        paths: dict[str, Path] = {}
        for image_id in ids:
            value = raw_paths.get(image_id)
            full = value if isinstance(value, str) and os.path.isabs(value) else os.path.join(root, str(value))
            if not isinstance(value, str) or not value or not _within(full, root):
                raise DataError(f"{data / 'paths.json'}: the path of {image_id!r} ({value!r}) is not inside the "
                                f"catalog root {root}; rebuild the index")
            paths[image_id] = Path(os.path.normpath(full))
        metadata = _read_data_json(data / "metadata.json", "index metadata", dict)
        row_dim = row_width(config)
        features = _load_features(data / "features.npy", count, row_dim)
        try:
            faiss_index = faiss.read_index(str(data / "faiss.index"))
        except RuntimeError as exc:
            raise DataError(f"corrupt FAISS file {data / 'faiss.index'}: {str(exc).strip().splitlines()[-1]}") from exc
        if faiss_index.ntotal != count or faiss_index.d != row_dim:
            raise DataError(f"{data / 'faiss.index'}: {faiss_index.ntotal} vectors of dimension {faiss_index.d}, "
                            f"but the manifest says {count} of dimension {row_dim}; rebuild the index")
        index = cls(folder, config, ids, metadata, paths, features, faiss_index)
        if model is not None and model.backbone.feature_dim != dim:
            raise ModelError(f"index {folder} holds {dim}-d features but the model {model.backbone.spec} makes "
                             f"{model.backbone.feature_dim}-d ones; use the model it was built with")
        if model is not None:
            index.check_model(model)
        return index

    def save(self) -> None:
        """Write a new data folder (files and folder fsynced), then point the manifest at it, then
        drop older data folders and leftovers of killed saves. Callers hold :func:`folder_lock`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".data-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        existing = [int(p.name[5:]) for p in self.folder.glob("data-*") if DATA_NAME.fullmatch(p.name)]
        number = max(existing, default=0) + 1  # never reuse the folder a live manifest may point to
        name = f"data-{number:06d}"
        tmp = self.folder / f".{name}.tmp"
        tmp.mkdir()
        root = self.config["root"] = catalog_root(self.paths.values(), self.config.get("root"))
        (tmp / "ids.json").write_text(json.dumps(self.ids), encoding="utf-8")
        (tmp / "metadata.json").write_text(json.dumps(self.metadata, default=str), encoding="utf-8")
        (tmp / "paths.json").write_text(json.dumps({k: os.path.relpath(v, root) for k, v in self.paths.items()}),
                                        encoding="utf-8")
        np.save(tmp / "features.npy", self.features)
        faiss.write_index(self.faiss_index, str(tmp / "faiss.index"))
        for file in tmp.iterdir():
            fsync_file(file)
        fsync_dir(tmp)
        os.replace(tmp, self.folder / name)
        fsync_dir(self.folder)
        self.config.update(data=name, count=len(self.ids), updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.write_manifest()
        for old in self.folder.glob("data-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def add_features(self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict],
                     paths: Mapping[str, Path]) -> None:
        """Append items (raw image features) in memory; call :meth:`save` to persist."""
        if not ids:
            return
        already = [i for i in ids if i in self.rows]
        if already:
            raise DataError(f"{len(already)} ids are already in index {self.folder}, first: {already[0]!r}; use upsert")
        self.faiss_index.add(item_vectors(features, self.config))
        for image_id in ids:
            self.rows[image_id] = len(self.ids)
            self.ids.append(image_id)
            self.metadata[image_id] = dict(metadata.get(image_id, {}))
            self.paths[image_id] = Path(paths[image_id]).resolve()
        self.features = np.concatenate([self.features, features.astype(np.float32)])
        self._columns = None

    def _rebuild_vectors(self) -> None:
        """Re-add every kept vector to the trained FAISS index (after rows were removed or replaced)."""
        self.faiss_index.reset()
        if len(self.features):
            self.faiss_index.add(item_vectors(self.features, self.config))
        self.rows = {image_id: row for row, image_id in enumerate(self.ids)}
        self._columns = None

    def upsert_features(self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict],
                        paths: Mapping[str, Path]) -> None:
        """Replace the features, metadata and path of known ids and append the new ones (in memory)."""
        features = np.asarray(features, dtype=np.float32)
        position = {image_id: n for n, image_id in enumerate(ids)}
        known = [i for i in ids if i in self.rows]
        for image_id in known:
            self.features[self.rows[image_id]] = features[position[image_id]]
            self.metadata[image_id] = dict(metadata.get(image_id, {}))
            self.paths[image_id] = Path(paths[image_id]).resolve()
        if known:
            self._rebuild_vectors()
        new = [i for i in ids if i not in self.rows]
        self.add_features(new, features[[position[i] for i in new]], metadata, paths)

    def remove(self, ids: Iterable[str]) -> list[str]:
        """Drop items in memory (call :meth:`save`); returns the ids that were in the index."""
        gone = [i for i in dict.fromkeys(ids) if i in self.rows]
        if gone:
            keep = np.ones(len(self.ids), dtype=bool)
            keep[[self.rows[i] for i in gone]] = False
            self.ids = [i for i, kept in zip(self.ids, keep) if kept]
            self.features = self.features[keep]
            for image_id in gone:
                self.metadata.pop(image_id, None)
                self.paths.pop(image_id, None)
            self._rebuild_vectors()
        return gone

    def _filter_columns(self) -> dict[str, np.ndarray]:
        """Metadata as text columns (built once per change) for vectorised filter evaluation."""
        if self._columns is None:
            self._columns = {field: np.array([field_text(self.metadata.get(i, {}).get(field)) for i in self.ids], dtype=object)
                             for field in self.fields}
        return self._columns

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[SearchHit]:
        return [SearchHit(self.ids[r], float(s), self.metadata.get(self.ids[r], {})) for s, r in zip(scores, rows) if r >= 0]

    def search_vectors(self, queries: np.ndarray, k: int, exclude: Iterable[str] = (),
                       filter: Filter | None = None) -> list[list[SearchHit]]:
        """Top ``k`` items per normalised query among the rows that match ``filter`` and are not in
        ``exclude``: FAISS pre-filters with an id selector; when an approximate index finds fewer
        than ``k`` of the allowed rows (a selective filter), those are ranked exactly."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        excluded = [self.rows[i] for i in set(exclude) if i in self.rows]
        if filter is None and not excluded:
            k = min(k, len(self.ids))
            if k <= 0:
                return [[] for _ in range(len(queries))]
            scores, rows = self.faiss_index.search(queries, k)
            return [self._hits(s, r) for s, r in zip(scores, rows)]
        allowed = filter.mask(self._filter_columns(), len(self.ids)) if filter is not None else np.ones(len(self.ids), bool)
        allowed[excluded] = False
        allowed_rows = np.flatnonzero(allowed)
        k = min(k, len(allowed_rows))
        if k <= 0:
            return [[] for _ in range(len(queries))]
        selector = faiss.IDSelectorBatch(allowed_rows.astype(np.int64))
        scores, rows = self.faiss_index.search(queries, k, params=_search_parameters(self.faiss_index, selector))
        results = []
        for query, score_row, id_row in zip(queries, scores, rows):
            if (id_row >= 0).sum() < k:  # the ANN probed too few allowed rows: rank them exactly
                gallery = DenseGallery(allowed_rows, item_vectors(self.features[allowed_rows], self.config))
                ranked = gallery.search(query[None], k)[0]
                score_row, id_row = np.array([s for _, s in ranked]), np.array([r for r, _ in ranked])
            results.append(self._hits(score_row, id_row))
        return results


# -- build, add, search --------------------------------------------------------------------------
def _encode(model: CIRModel, paths: dict[str, Path], cache_dir: Path, batch_size: int, num_workers: int,
            progress: bool) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    cache = FeatureCache(cache_dir)
    ids, features = cache.encode(model.backbone, paths, batch_size=batch_size, num_workers=num_workers,
                                 on_error="skip", progress=progress)
    stats = cache.last_stats
    encoded = set(ids)
    failures = {i: stats.errors.get(i, "not encoded") for i in paths if i not in encoded}
    return ids, features, {"requested": stats.requested, "computed": stats.computed, "reused": stats.reused,
                           "failed": len(failures), "failures": failures, "encode_seconds": round(stats.seconds, 3)}


def _stored_rows(model: CIRModel, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict],
                 cache_dir: Path) -> np.ndarray:
    """The rows an index stores (see :func:`~fashion_cir.retrieval.store.item_vectors`): raw image
    features, then the item's description features and attributes where the model reads them."""
    parts = [p.numpy() for p in item_parts(model, ids, metadata, cache_dir) if p is not None]
    return np.concatenate([features.astype(np.float32), *parts], axis=1) if parts else features


def build_index(folder: str | Path, model: CIRModel, images: str | Path | Mapping[str, str | Path],
                metadata: str | Path | Iterable[str | Path] | Mapping[str, dict] | None = None, *,
                ids: Iterable[str] | None = None, factory: str = DEFAULT_FACTORY, nprobe: int = 16,
                ef_search: int = 64, cache_dir: str | Path | None = None, batch_size: int = 64,
                num_workers: int = 0, overwrite: bool = False, progress: bool = True,
                store: str | StoreSpec = "faiss", milvus: Mapping[str, Any] | None = None,
                max_failed_share: float = DEFAULT_MAX_FAILED_SHARE) -> CatalogStore:
    """Encode a catalog with ``model`` and write a new index folder.

    Images that cannot be decoded are left out and listed with their reasons in
    ``index.report["failures"]``; when all of them, or more than ``max_failed_share``, fail, nothing
    is written and DataError names the first reasons. Encoding goes through a feature cache
    (default ``folder/feature-cache``), so an interrupted build resumes.
    ``factory`` is a FAISS factory string; ``nprobe`` / ``ef_search`` tune IVF / HNSW searches.
    ``store`` is ``faiss`` or a Milvus spec (``milvus:PATH.db``, ``milvus:http://host:19530``);
    ``milvus`` holds its options (``collection``, ``index_type``, ``index_params``)."""
    folder = Path(folder)
    spec = parse_store_spec(store) if isinstance(store, str) else store
    with folder_lock(folder):
        if (folder / INDEX_FILE).exists() and not overwrite:
            raise DataError(f"an index already exists in {folder}; add images with `fashion-cir index add`, "
                            "or rebuild with --overwrite")
        paths, meta = load_catalog(images, metadata, ids)
        encoded, features, report = _encode(model, paths, Path(cache_dir or folder / "feature-cache"),
                                            batch_size, num_workers, progress)
        check_failures(report["failures"], len(paths), max_failed_share, "catalog images")
        start = time.perf_counter()
        rows = _stored_rows(model, encoded, features, meta, Path(cache_dir or folder / "feature-cache"))
        backbone = model.backbone
        factory = resolve_factory(factory, len(encoded))
        config = {"format": FORMAT, "store": spec.to_config(), "fields": filterable_fields(meta.values()),
                  "factory": factory, "metric": "inner_product", "feature_dim": int(features.shape[1]),
                  "matcher": model.matcher.config() if model.matcher is not None else None,
                  "attributes": model.attribute_space.names if model.attribute_space is not None else None,
                  "blocks": model.block_dims(),
                  "nprobe": nprobe, "ef_search": ef_search, "backbone": backbone.spec,
                  "model_dir": str(model.source) if model.source else None,
                  "preprocess": backbone.preprocess_description, "image_fingerprint": backbone.image_fingerprint(),
                  "count": 0, "data": None, "root": catalog_root(paths[i] for i in encoded),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": environment_info()}
        if spec.kind == "milvus":
            from .milvus_store import MilvusIndex

            index: CatalogStore = MilvusIndex.create(folder, config, dict(milvus or {}), overwrite=overwrite)
        else:
            empty = np.zeros((0, rows.shape[1]), dtype=np.float32)
            index = CatalogIndex(folder, config, [], {}, {}, empty, _new_faiss_index(factory, item_vectors(rows, config)))
        try:
            index.add_features(encoded, rows, meta, paths)
            index.save()
        except BaseException:
            index.discard()
            raise
    index.report = {**report, "added": len(encoded), "index_seconds": round(time.perf_counter() - start, 3)}
    return index


def add_to_index(folder: str | Path, model: CIRModel, images: str | Path | Mapping[str, str | Path],
                 metadata: str | Path | Iterable[str | Path] | Mapping[str, dict] | None = None, *,
                 replace: bool = False, ids: Iterable[str] | None = None, cache_dir: str | Path | None = None,
                 batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                 max_failed_share: float = DEFAULT_MAX_FAILED_SHARE) -> CatalogStore:
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
            check_failures(report["failures"], len(todo), max_failed_share, "catalog images" if replace else "new catalog images")
            index.config["root"] = catalog_root((todo[i] for i in encoded), index.config.get("root"))
            replaced = sum(1 for i in encoded if i in index)
            write = index.upsert_features if replace else index.add_features
            write(encoded, _stored_rows(model, encoded, features, meta, cache), meta, todo)
            index.save()
    if replace:
        index.report = {**report, "replaced": replaced, "added": len(encoded) - replaced}
    else:
        index.report = {**report, "requested": len(paths), "already_indexed": len(paths) - len(todo),
                        "added": report["computed"] + report["reused"]}
    return index


def upsert_index(folder: str | Path, model: CIRModel, images: str | Path | Mapping[str, str | Path],
                 metadata: str | Path | Iterable[str | Path] | Mapping[str, dict] | None = None, **options: Any) -> CatalogStore:
    """Insert or replace catalog items: :func:`add_to_index` with ``replace=True``."""
    return add_to_index(folder, model, images, metadata, replace=True, **options)


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


@torch.no_grad()
def encode_reference_image(model: CIRModel, image: Image.Image) -> torch.Tensor:
    """Raw image features [1, d] of an uploaded reference image."""
    backbone = model.backbone
    pixels = backbone.preprocess(image.convert("RGB")).unsqueeze(0).to(backbone.device)
    return backbone.encode_images(pixels).float().cpu()


def search(model: CIRModel, index: CatalogStore, image: Image.Image | None = None, item_id: str | None = None,
           text: str = "", k: int = 10, exclude_reference: bool = False,
           filter: Filter | None = None) -> list[SearchHit]:
    """Composed search: reference (an uploaded ``image`` or a catalog ``item_id``) + relative ``text``
    -> the top ``k`` hits (see :func:`fashion_cir.retrieval.query.composed_search`, which also
    pages, applies attribute filters and reports the prompt used). The text side is
    ``model.query_text(text, the reference description)``: the catalog item's ``description``, or
    for an upload the one its attribute heads predict. ``exclude_reference`` drops the reference
    item from the results; ``filter`` (:func:`~fashion_cir.retrieval.filters.parse_filter`) keeps
    only matching items."""
    from .query import composed_search

    return composed_search(model, index, image, item_id, text, k, exclude_reference=exclude_reference,
                           filter=filter).hits
