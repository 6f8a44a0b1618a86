"""An exact, in-memory gallery: the inner products of query and item vectors, ranked; the FAISS
store uses it for filtered searches over few items."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

import numpy as np
import torch

ItemId = TypeVar("ItemId", bound=Hashable)  # catalog ids (str), or FAISS row numbers


class DenseGallery(Generic[ItemId]):
    """An exact, in-memory gallery: item ids and their vectors [G, D]; ties go to the earlier item."""

    def __init__(self, ids: Iterable[ItemId], vectors: torch.Tensor | np.ndarray):
        self.ids = list(ids)
        self.vectors = vectors.numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
        self.position = {item_id: i for i, item_id in enumerate(self.ids)}

    def scores(self, queries: torch.Tensor | np.ndarray) -> np.ndarray:
        queries = queries.numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
        return queries.astype(np.float32) @ self.vectors.astype(np.float32).T

    def search(
        self, queries: torch.Tensor | np.ndarray, k: int, exclude: Iterable[Iterable[ItemId]] | None = None
    ) -> list[list[tuple[ItemId, float]]]:
        """Top ``k`` (id, score) per query, each query's ``exclude`` ids left out."""
        scores = self.scores(queries)
        excluded = list(exclude) if exclude is not None else [()] * len(scores)
        results = []
        for row, left_out in zip(scores, excluded):
            left_out = set(left_out)
            order = [i for i in np.argsort(-row, kind="stable") if self.ids[i] not in left_out][:k]
            results.append([(self.ids[i], float(row[i])) for i in order])
        return results
