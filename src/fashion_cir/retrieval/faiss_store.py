"""The FAISS store: an index folder loaded into memory, searched in-process.

Folder layout: ``index.json`` (the manifest, :mod:`~fashion_cir.retrieval.manifest`) and
``data-NNNNNN/`` (``ids.json``, ``metadata.json``, ``paths.json``, ``features.npy`` raw float32
image features, ``faiss.index`` over the L2-normalised features). Every save writes a new data
folder and then swaps the manifest atomically, so a crash leaves the previous index intact; writers
(build, add, upsert, remove: :mod:`~fashion_cir.retrieval.index`) hold a lock on the folder. Image
paths are stored relative to the catalog root the manifest records, and loading refuses any path
outside it; a corrupt folder is a one-line DataError naming the file."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from ..errors import DataError, ModelError
from ..io import fsync_dir, fsync_file, read_json
from .dense import DenseGallery
from .filters import Filter, field_text, filterable_fields
from .manifest import DATA_NAME, INDEX_FILE, catalog_root, read_manifest
from .store import CatalogStore, SearchHit, item_vectors, row_width

if TYPE_CHECKING:
    from ..models.cir import CIRModel

DEFAULT_FACTORY = "auto"
AUTO_EXACT_BELOW = 200_000  # BENCHMARKS.md, ANN section: exact search stays fast enough below this
DATA_FILES = ("ids.json", "metadata.json", "paths.json", "features.npy", "faiss.index")
# how a reader opens a manifest's ``mmap`` index: the codes of flat, SQ, PQ and IVF indexes (and
# HNSW's storage) are mapped from faiss.index, not read; faiss >= 1.11 (the HNSW graph is read)
MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


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
        raise DataError(
            f"bad FAISS factory string {factory!r} (e.g. 'Flat', 'IVF256,Flat', 'HNSW32'): "
            f"{str(exc).strip().splitlines()[-1]}"
        ) from exc
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and len(vectors) < ivf.nlist:
            raise DataError(
                f"index {factory!r} has {ivf.nlist} lists but the catalog has only {len(vectors)} "
                f"images to train them; use fewer lists (about sqrt(N), e.g. 'IVF{max(1, int(len(vectors) ** 0.5))},Flat') or 'Flat'"
            )
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


def _within(path: str, root: str) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return os.path.commonpath([path, root]) == root


def _read_data_json(path: Path, what: str, kind: type) -> Any:
    value = read_json(path, what)
    if not isinstance(value, kind):
        raise DataError(
            f"{path}: expected a JSON {'list' if kind is list else 'object'}, got {type(value).__name__}; rebuild the index"
        )
    return value


def _load_features(path: Path, count: int, dim: int, mmap: bool) -> np.ndarray:
    try:
        features = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, EOFError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"corrupt feature file {path}: {reason}; rebuild the index") from exc
    if not isinstance(features, np.ndarray) or features.dtype.kind != "f" or features.shape != (count, dim):
        raise DataError(
            f"{path}: expected {count} x {dim} float features, got shape {getattr(features, 'shape', None)} "
            f"({getattr(features, 'dtype', '?')}); rebuild the index"
        )
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

    def __init__(
        self,
        folder: Path,
        config: dict[str, Any],
        ids: list[str],
        metadata: dict[str, dict],
        paths: dict[str, Path],
        features: np.ndarray,
        faiss_index: faiss.Index,
        mapped: bool = False,
    ):
        self.folder = Path(folder)
        self.mapped = mapped  # features and faiss_index are memory-mapped, read only
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

    def stored_rows(self, ids: list[str]) -> np.ndarray:
        return np.asarray(self.features[[self.rows[i] for i in ids]], dtype=np.float32)

    @classmethod
    def create(cls, folder: str | Path, config: dict[str, Any], rows: np.ndarray) -> CatalogIndex:
        """An empty index for a new folder whose FAISS index (``config["factory"]``) is trained on
        the item vectors of ``rows``; add the rows with :meth:`add_features`, then :meth:`save`."""
        empty = np.zeros((0, rows.shape[1]), dtype=np.float32)
        return cls(
            Path(folder), config, [], {}, {}, empty, _new_faiss_index(config["factory"], item_vectors(rows, config))
        )

    @classmethod
    def load(cls, folder: str | Path, model: CIRModel | None = None, read_only: bool = False) -> CatalogIndex:
        """Open an index folder; with ``model``, refuse it unless its image fingerprint matches.
        ``read_only`` (a reader: search, the service) maps the FAISS index and the stored rows
        from disk when the manifest says ``mmap``, so opening reads neither into memory."""
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
            raise DataError(
                f"{data / 'ids.json'}: expected {count} distinct id strings (the manifest's count), "
                f"got {len(ids)} entries; rebuild the index"
            )
        raw_paths = _read_data_json(data / "paths.json", "index paths", dict)
        paths: dict[str, Path] = {}
        for image_id in ids:
            value = raw_paths.get(image_id)
            full = value if isinstance(value, str) and os.path.isabs(value) else os.path.join(root, str(value))
            if not isinstance(value, str) or not value or not _within(full, root):
                raise DataError(
                    f"{data / 'paths.json'}: the path of {image_id!r} ({value!r}) is not inside the "
                    f"catalog root {root}; rebuild the index"
                )
            paths[image_id] = Path(os.path.normpath(full))
        metadata = _read_data_json(data / "metadata.json", "index metadata", dict)
        row_dim = row_width(config)
        mapped = read_only and bool(config.get("mmap"))
        features = _load_features(data / "features.npy", count, row_dim, mapped)
        try:
            faiss_index = faiss.read_index(str(data / "faiss.index"), MMAP_FLAGS if mapped else 0)
        except RuntimeError as exc:
            raise DataError(f"corrupt FAISS file {data / 'faiss.index'}: {str(exc).strip().splitlines()[-1]}") from exc
        if faiss_index.ntotal != count or faiss_index.d != row_dim:
            raise DataError(
                f"{data / 'faiss.index'}: {faiss_index.ntotal} vectors of dimension {faiss_index.d}, "
                f"but the manifest says {count} of dimension {row_dim}; rebuild the index"
            )
        index = cls(folder, config, ids, metadata, paths, features, faiss_index, mapped)
        if model is not None and model.backbone.feature_dim != dim:
            raise ModelError(
                f"index {folder} holds {dim}-d features but the model {model.backbone.spec} makes "
                f"{model.backbone.feature_dim}-d ones; use the model it was built with"
            )
        if model is not None:
            index.check_model(model)
        return index

    def save(self) -> None:
        """Write a new data folder (files and folder fsynced), then point the manifest at it, then
        drop older data folders and leftovers of killed saves. Callers hold :func:`folder_lock`."""
        self._check_writable()
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
        (tmp / "paths.json").write_text(
            json.dumps({k: os.path.relpath(v, root) for k, v in self.paths.items()}), encoding="utf-8"
        )
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

    def add_features(
        self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict], paths: Mapping[str, Path]
    ) -> None:
        """Append items (raw image features) in memory; call :meth:`save` to persist."""
        self._check_writable()
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

    def upsert_features(
        self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict], paths: Mapping[str, Path]
    ) -> None:
        """Replace the features, metadata and path of known ids and append the new ones (in memory)."""
        self._check_writable()
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
        self._check_writable()
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

    def _check_writable(self) -> None:
        """A mapped index is read only (FAISS aborts the process on changing mapped codes)."""
        if self.mapped:
            raise DataError(
                f"index {self.folder} is open memory-mapped (read only); open it without read_only to change it"
            )

    def _filter_columns(self) -> dict[str, np.ndarray]:
        """Metadata as text columns (built once per change) for vectorised filter evaluation."""
        if self._columns is None:
            self._columns = {
                field: np.array([field_text(self.metadata.get(i, {}).get(field)) for i in self.ids], dtype=object)
                for field in self.fields
            }
        return self._columns

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[SearchHit]:
        return [
            SearchHit(self.ids[r], float(s), self.metadata.get(self.ids[r], {})) for s, r in zip(scores, rows) if r >= 0
        ]

    def search_vectors(
        self, queries: np.ndarray, k: int, exclude: Iterable[str] = (), filter: Filter | None = None
    ) -> list[list[SearchHit]]:
        """Top ``k`` items per normalised query among the rows that match ``filter`` and are not in
        ``exclude``: FAISS pre-filters with an id selector; when an approximate index finds fewer
        than ``k`` of the allowed rows (a selective filter, or a deep page past what ``nprobe``
        lists hold), those are ranked exactly."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        excluded = [self.rows[i] for i in set(exclude) if i in self.rows]
        if filter is None:  # a few excluded rows are dropped from a deeper search, not selected out
            wanted = min(k, len(self.ids) - len(excluded))
            if wanted <= 0:
                return [[] for _ in range(len(queries))]
            scores, rows = self.faiss_index.search(queries, wanted + len(excluded))
            kept = ~np.isin(rows, excluded)
            if (rows >= 0).all() and (kept.sum(axis=1) >= wanted).all():
                return [self._hits(s[keep][:wanted], r[keep][:wanted]) for s, r, keep in zip(scores, rows, kept)]
        allowed = (
            filter.mask(self._filter_columns(), len(self.ids)) if filter is not None else np.ones(len(self.ids), bool)
        )
        allowed[excluded] = False
        allowed_rows = np.flatnonzero(allowed)
        k = min(k, len(allowed_rows))
        if k <= 0:
            return [[] for _ in range(len(queries))]
        bitmap = np.packbits(allowed, bitorder="little")  # row r is bit r % 8 of byte r // 8, as FAISS reads it
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        scores, rows = self.faiss_index.search(queries, k, params=_search_parameters(self.faiss_index, selector))
        results = []
        for query, score_row, id_row in zip(queries, scores, rows):
            if (id_row >= 0).sum() < k:  # the ANN probed too few allowed rows: rank them exactly
                gallery = DenseGallery(allowed_rows, item_vectors(self.features[allowed_rows], self.config))
                ranked = gallery.search(query[None], k)[0]
                score_row, id_row = np.array([s for _, s in ranked]), np.array([r for r, _ in ranked])
            results.append(self._hits(score_row, id_row))
        return results
