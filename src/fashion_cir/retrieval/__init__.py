"""Catalog retrieval: vector stores (FAISS in-process, Milvus embedded or remote) of catalog image
features, a metadata filter grammar, and composed-query search."""

from ..data.metadata import load_catalog
from .filters import Filter, FilterError, parse_filter
from .index import CatalogIndex, add_to_index, build_index, remove_from_index, search, upsert_index
from .store import CatalogStore, SearchHit, open_index, parse_store_spec

__all__ = ["CatalogIndex", "CatalogStore", "Filter", "FilterError", "SearchHit", "add_to_index", "build_index",
           "load_catalog", "open_index", "parse_filter", "parse_store_spec", "remove_from_index", "search",
           "upsert_index"]
