"""Catalog retrieval: vector stores (FAISS in-process, Milvus embedded or remote) of catalog image
features, a metadata filter grammar, and composed-query search."""

from ..data.metadata import load_catalog
from .faiss_store import CatalogIndex
from .filters import Filter, FilterError, parse_filter
from .folder import open_index
from .index import add_to_index, build_index, remove_from_index
from .query import search
from .store import CatalogStore, SearchHit, parse_store_spec

__all__ = [
    "CatalogIndex",
    "CatalogStore",
    "Filter",
    "FilterError",
    "SearchHit",
    "add_to_index",
    "build_index",
    "load_catalog",
    "open_index",
    "parse_filter",
    "parse_store_spec",
    "remove_from_index",
    "search",
]
