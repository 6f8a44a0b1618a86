"""The Milvus store: catalog items in a Milvus collection, through pymilvus (imported lazily).

The same code talks to milvus-lite (``milvus:runs/x/milvus.db``: an embedded server in one local
file, one process at a time) and to Milvus standalone or a cluster (``milvus:http://host:19530``:
many writers and readers, live). One row per item: ``id`` (primary key), ``vector`` (the item
vector the index searches by inner product, :func:`~fashion_cir.retrieval.store.item_vectors` of
the stored row: the L2-normalised image block, then the description and attribute blocks of a
model that reads them; ``row_width(config)`` values), ``norm`` (the image block's norm, so the raw
row is ``vector`` with its image block times ``norm``), ``path``, ``meta`` (the metadata as JSON)
and one text field ``m_<field>`` per filterable metadata field
(:func:`~fashion_cir.retrieval.filters.field_text`), which filters compile to."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, FashionCIRError
from ..io import write_json
from .filters import Filter, field_text, milvus_list
from .store import CatalogStore, SearchHit, item_vectors, parse_store_spec, row_width

FIELD_PREFIX = "m_"
MAX_TEXT = 65535
BATCH = 1000
COLLECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
PENDING = ".milvus-build.json"  # names the collection of a build that has not written index.json yet
DEFAULT_INDEX = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": 1024},
    "IVF_SQ8": {"nlist": 1024},
    "HNSW": {"M": 16, "efConstruction": 200},
}
_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _pymilvus():
    try:
        import pymilvus
    except ImportError as exc:
        raise FashionCIRError(
            "the milvus store needs pymilvus (and milvus-lite for .db files): pip install 'fashion-cir[milvus]'"
        ) from exc
    return pymilvus


def client_for(uri: str):
    """One MilvusClient per URI in this process (milvus-lite allows one process per file)."""
    with _clients_lock:
        if uri not in _clients:
            pymilvus = _pymilvus()
            if not uri.startswith(("http://", "https://", "tcp://", "unix:")):
                Path(uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                _clients[uri] = pymilvus.MilvusClient(uri, timeout=30)
            except pymilvus.exceptions.MilvusException as exc:
                if uri.endswith(".db"):
                    raise DataError(
                        f"cannot open the milvus-lite file {uri} ({exc.message}): milvus-lite lets one "
                        "process use a file at a time; stop the other one (e.g. `fashion-cir serve`) "
                        "or use a Milvus server (milvus:http://host:19530)"
                    ) from exc
                raise DataError(f"cannot connect to Milvus at {uri}: {exc.message}") from exc
        return _clients[uri]


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence milvus-lite's logged tracebacks for the timestamp call it does not implement
    (pymilvus asks for it while waiting on an index and in query iterators, then carries on)."""
    loggers = [logging.getLogger(name) for name in ("grpc._server", "pymilvus")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def parse_index_option(text: str) -> dict[str, Any]:
    """``IVF_FLAT,nlist=256`` / ``HNSW,M=32,efConstruction=200`` / ``FLAT`` -> index config."""
    kind, *pairs = [part.strip() for part in text.split(",") if part.strip()]
    kind = kind.upper()
    params: dict[str, Any] = dict(DEFAULT_INDEX.get(kind, {}))
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not value.strip().lstrip("-").isdigit():
            raise DataError(f"bad Milvus index option {pair!r} in {text!r}: expected NAME=INTEGER")
        params[key.strip()] = int(value)
    return {"index_type": kind, "index_params": params}


def _check_store(folder: Path, store: dict[str, Any]) -> None:
    """Refuse a manifest's Milvus fields unless they are what a build writes: an absolute .db path
    that exists (or a server URI), a collection name and an index type."""
    where = f"{folder / 'index.json'}: field 'store'"
    for key in ("uri", "collection", "index_type"):
        if not isinstance(store.get(key), str):
            raise DataError(f"{where} lacks the text {key!r}; rebuild the index")
    if not COLLECTION.fullmatch(store["collection"]):
        raise DataError(f"{where} names a bad collection {store['collection']!r}; rebuild the index")
    spec = parse_store_spec("milvus:" + store["uri"])
    if spec.uri != store["uri"]:
        raise DataError(f"{where} names {store['uri']!r}: not an absolute .db path or a server URI; rebuild the index")
    if spec.embedded and spec.uri is not None and not Path(spec.uri).exists():
        raise DataError(f"{where} names the milvus-lite file {spec.uri}, which does not exist; rebuild the index")


def _interrupted_build(folder: Path, uri: str, name: str) -> bool:
    """Whether collection ``name`` at ``uri`` was created by a build of ``folder`` that never wrote
    its manifest (killed): a re-run may drop it and start again."""
    marker = folder / PENDING
    if (folder / "index.json").exists() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == {"uri": uri, "collection": name}
    except (OSError, ValueError, RecursionError):
        return False


def _id_in(ids: list[str]) -> str:
    """The expression selecting rows by primary key."""
    return f"id in {milvus_list(ids)}"


class _Lookup(Mapping):
    """A read-through id -> value view of one stored field (``metadata`` or ``paths``)."""

    def __init__(self, store: MilvusIndex, field: str):
        self.store, self.field = store, field

    def __getitem__(self, image_id: str) -> Any:
        rows = self.store._get([image_id], [self.field])
        if not rows:
            raise KeyError(image_id)
        return self._value(rows[0][self.field])

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        """Every (id, value) from one scan, not one query per id."""
        return [(row["id"], self._value(row[self.field])) for row in self.store._scan("", ["id", self.field])]

    def _value(self, stored: str) -> Any:
        return json.loads(stored) if self.field == "meta" else Path(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.ids)

    def __len__(self) -> int:
        return len(self.store)


class MilvusIndex(CatalogStore):
    """An index folder whose items live in a Milvus collection (``config['store']`` says where)."""

    def __init__(self, folder: Path, config: dict[str, Any]):
        self.folder = Path(folder)
        self.config = config
        self.report: dict[str, Any] = {}
        self.milvus = config["store"]
        self.collection = self.milvus["collection"]
        self.client = client_for(self.milvus["uri"])

    # -- creation and opening --------------------------------------------------------------------
    @classmethod
    def create(
        cls, folder: Path, config: dict[str, Any], options: Mapping[str, Any], overwrite: bool = False
    ) -> MilvusIndex:
        """Create the collection (schema from ``config['fields']``) for a new index folder."""
        pymilvus = _pymilvus()
        folder = Path(folder)
        name = options.get("collection") or "fashion_cir_" + re.sub(r"\W", "_", folder.resolve().name)
        if not COLLECTION.fullmatch(name):
            raise DataError(
                f"bad Milvus collection name {name!r}: letters, digits and underscores, not starting with a digit"
            )
        index = dict(parse_index_option(options.get("index", "FLAT")))
        config["store"] = {**config["store"], "collection": name, **index}
        store = cls(folder, config)
        client = store.client
        uri = config["store"]["uri"]
        if client.has_collection(name):
            if not (overwrite or _interrupted_build(folder, uri, name)):
                raise DataError(
                    f"Milvus collection {name!r} already exists at {uri}; "
                    "choose another with --milvus-collection, or rebuild with --overwrite"
                )
            client.drop_collection(name)
        write_json(folder / PENDING, {"uri": uri, "collection": name})
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        DataType = pymilvus.DataType
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=row_width(config))
        schema.add_field("norm", DataType.FLOAT)
        schema.add_field("path", DataType.VARCHAR, max_length=4096)
        schema.add_field("meta", DataType.VARCHAR, max_length=MAX_TEXT)
        for field in config["fields"]:
            schema.add_field(FIELD_PREFIX + field, DataType.VARCHAR, max_length=MAX_TEXT)
        params = client.prepare_index_params()
        params.add_index(
            field_name="vector", index_type=index["index_type"], metric_type="IP", params=index["index_params"]
        )
        try:
            with _quiet():
                client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")
        except pymilvus.exceptions.MilvusException as exc:
            (folder / PENDING).unlink(missing_ok=True)
            raise DataError(
                f"cannot create Milvus collection {name!r} with index {index['index_type']} "
                f"{index['index_params']}: {exc.message}"
            ) from exc
        return store

    @classmethod
    def open(cls, folder: Path, config: dict[str, Any]) -> MilvusIndex:
        """Open the collection an index folder's manifest names (checked first: opening a
        milvus-lite file that is not there would create it, and its folders, wherever it says)."""
        _check_store(folder, config["store"])
        store = cls(folder, config)
        if not store.client.has_collection(store.collection):
            raise DataError(
                f"index {folder}: Milvus collection {store.collection!r} is missing at "
                f"{config['store']['uri']}; rebuild the index"
            )
        fields = {f["name"]: f for f in store.client.describe_collection(store.collection)["fields"]}
        dim = int((fields.get("vector") or {}).get("params", {}).get("dim", -1))
        if dim != row_width(config):
            raise DataError(
                f"index {folder}: Milvus collection {store.collection!r} holds {dim}-value vectors but the "
                f"manifest's blocks {config.get('blocks')} make {row_width(config)}; rebuild the index"
            )
        store.client.load_collection(store.collection)
        return store

    # -- reading ---------------------------------------------------------------------------------
    def _get(self, ids: list[str], fields: list[str]) -> list[dict]:
        """The rows of these ids, by a primary-key expression of escaped literals (pymilvus's own
        ``get``/``delete`` by ids quote them without escaping)."""
        rows: list[dict] = []
        for start in range(0, len(ids), BATCH):
            batch = ids[start : start + BATCH]
            rows.extend(self.client.query(self.collection, filter=_id_in(batch), output_fields=fields))
        return rows

    def __len__(self) -> int:
        return int(self.client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and bool(self._get([image_id], ["id"]))

    def _scan(self, expression: str, fields: list[str]) -> list[dict]:
        """Every row matching ``expression`` (through a query iterator)."""
        with _quiet():
            iterator = self.client.query_iterator(
                self.collection, batch_size=BATCH, filter=expression, output_fields=fields
            )
            rows: list[dict] = []
            while batch := iterator.next():
                rows.extend(batch)
            iterator.close()
        return rows

    @property  # the base declares an attribute (the FAISS store's); here a read on demand
    def ids(self) -> list[str]:  # type: ignore[override]
        return [row["id"] for row in self._scan("", ["id"])]

    @property  # the base declares an attribute (the FAISS store's); here a read on demand
    def metadata(self) -> Mapping[str, dict]:  # type: ignore[override]
        return _Lookup(self, "meta")

    @property  # the base declares an attribute (the FAISS store's); here a read on demand
    def paths(self) -> Mapping[str, Path]:  # type: ignore[override]
        return _Lookup(self, "path")

    def vector(self, image_id: str) -> np.ndarray:
        rows = self._get([image_id], ["vector", "norm"])
        if not rows:
            raise DataError(f"unknown catalog id {image_id!r}")
        row = np.array(rows[0]["vector"], dtype=np.float32)
        row[: int(self.config["feature_dim"])] *= np.float32(rows[0]["norm"])  # the other blocks are stored raw
        return row

    def stored_rows(self, ids: list[str]) -> np.ndarray:
        """The raw rows of these items from one query per thousand ids (not one per item)."""
        found = {row["id"]: row for row in self._get(list(dict.fromkeys(ids)), ["id", "vector", "norm"])}
        missing = [i for i in ids if i not in found]
        if missing:
            raise DataError(f"unknown catalog id {missing[0]!r}")
        rows = np.array([found[i]["vector"] for i in ids], dtype=np.float32)
        rows[:, : int(self.config["feature_dim"])] *= np.array([[found[i]["norm"]] for i in ids], dtype=np.float32)
        return rows

    def _search_params(self) -> dict[str, Any]:
        kind = self.milvus["index_type"]
        params = (
            {"nprobe": self.config["nprobe"]}
            if kind.startswith("IVF")
            else {"ef": self.config["ef_search"]}
            if kind == "HNSW"
            else {}
        )
        return {"metric_type": "IP", "params": params}

    def search_vectors(
        self, queries: np.ndarray, k: int, exclude: Iterable[str] = (), filter: Filter | None = None
    ) -> list[list[SearchHit]]:
        """Filtered search in Milvus; when an approximate index returns fewer than ``k`` of the
        allowed items (a selective filter), the allowed items are ranked exactly here."""
        clauses = [filter.to_milvus(FIELD_PREFIX)] if filter is not None else []
        excluded = sorted(set(exclude))
        if excluded:
            clauses.append(f"(id not in {milvus_list(excluded)})")
        expression = " and ".join(clauses)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        answers = self.client.search(
            self.collection,
            data=queries.tolist(),
            filter=expression,
            limit=k,
            output_fields=["meta"],
            search_params=self._search_params(),
        )
        results = []
        allowed: int | None = None
        for query, answer in zip(queries, answers):
            hits = [SearchHit(hit["id"], float(hit["distance"]), json.loads(hit["entity"]["meta"])) for hit in answer]
            if len(hits) < k:
                if allowed is None:
                    allowed = int(
                        self.client.query(self.collection, filter=expression, output_fields=["count(*)"])[0]["count(*)"]
                    )
                if allowed > len(hits):
                    hits = self._exact(query, k, expression)
            results.append(hits)
        return results

    def _exact(self, query: np.ndarray, k: int, expression: str) -> list[SearchHit]:
        rows = self._scan(expression, ["id", "vector", "meta"])
        scores = np.asarray([row["vector"] for row in rows], dtype=np.float32) @ query
        top = np.argsort(-scores, kind="stable")[:k]
        return [SearchHit(rows[i]["id"], float(scores[i]), json.loads(rows[i]["meta"])) for i in top]

    # -- writing ---------------------------------------------------------------------------------
    def _rows(
        self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict], paths: Mapping[str, Path]
    ) -> list[dict]:
        features = np.asarray(features, dtype=np.float32)
        width = row_width(self.config)
        if features.ndim != 2 or features.shape[1] != width:
            raise DataError(
                f"index {self.folder} stores rows of {width} values ({self.config.get('blocks')}), "
                f"got {features.shape[-1] if features.ndim else 0}; use the model the index was built with"
            )
        dim = int(self.config["feature_dim"])
        norms = np.maximum(np.linalg.norm(features[:, :dim], axis=1), 1e-12)
        vectors = item_vectors(features, self.config)
        rows = []
        for image_id, feature, norm in zip(ids, vectors, norms):
            meta = dict(metadata.get(image_id, {}))
            encoded = json.dumps(meta, default=str, ensure_ascii=False)
            if len(encoded.encode("utf-8")) > MAX_TEXT:
                raise DataError(
                    f"metadata of item {image_id!r} is {len(encoded)} characters of JSON; the Milvus store keeps at most {MAX_TEXT} bytes"
                )
            row = {
                "id": image_id,
                "vector": feature.tolist(),
                "norm": float(norm),
                "path": str(Path(paths[image_id]).resolve()),
                "meta": encoded,
            }
            row.update({FIELD_PREFIX + f: field_text(meta.get(f))[: MAX_TEXT // 4] for f in self.fields})
            rows.append(row)
        return rows

    def add_features(
        self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict], paths: Mapping[str, Path]
    ) -> None:
        if not ids:
            return
        already = [row["id"] for row in self._get(list(ids), ["id"])]
        if already:
            raise DataError(f"{len(already)} ids are already in index {self.folder}, first: {already[0]!r}; use upsert")
        rows = self._rows(ids, features, metadata, paths)
        for start in range(0, len(rows), BATCH):
            self.client.insert(self.collection, rows[start : start + BATCH])

    def upsert_features(
        self, ids: list[str], features: np.ndarray, metadata: Mapping[str, dict], paths: Mapping[str, Path]
    ) -> None:
        rows = self._rows(ids, features, metadata, paths)
        for start in range(0, len(rows), BATCH):
            self.client.upsert(self.collection, rows[start : start + BATCH])

    def remove(self, ids: Iterable[str]) -> list[str]:
        wanted = list(dict.fromkeys(ids))
        present = {row["id"] for row in self._get(wanted, ["id"])}
        gone = [i for i in wanted if i in present]
        for start in range(0, len(gone), BATCH):
            self.client.delete(self.collection, filter=_id_in(gone[start : start + BATCH]))
        return gone

    def save(self) -> None:
        """Flush the collection and refresh the manifest's count (Milvus itself is already live)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.client.flush(self.collection)
        self.config.update(count=len(self), updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.write_manifest()
        (self.folder / PENDING).unlink(missing_ok=True)

    def discard(self) -> None:
        """Drop the collection of a build that failed before writing its manifest."""
        self.client.drop_collection(self.collection)
        (self.folder / PENDING).unlink(missing_ok=True)
