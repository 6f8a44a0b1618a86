"""Catalog retrieval: a FAISS index of catalog image features and composed-query search."""

from .index import CatalogIndex, SearchHit, add_to_index, build_index, load_catalog, search

__all__ = ["CatalogIndex", "SearchHit", "add_to_index", "build_index", "load_catalog", "search"]
