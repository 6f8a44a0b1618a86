"""Two-stage search: the store finds ``candidates`` items (filters and exclusions applied, by its
own, possibly approximate or compressed, index), a second scorer orders them from their stored
rows, and the top ``k`` are returned.

The second scorer is a :class:`Rescorer`: given one query (its fused vector and the model's
:class:`~fashion_cir.models.fusion.QueryParts`) and the candidates' ids and stored raw rows
(:meth:`~fashion_cir.retrieval.store.CatalogStore.stored_rows`), it returns one score per candidate.
:class:`ExactScorer` recomputes the model's fused score in float32 from the rows, so an IVF, SQ8
or fp16 index gets exact ordering back; a learned re-ranker is another :class:`Rescorer`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import DataError
from .filters import Filter
from .store import CatalogStore, SearchHit, item_vectors

if TYPE_CHECKING:
    from ..models.fusion import QueryParts


@dataclass(frozen=True)
class RescoreQuery:
    """What a second scorer may read of one query: the fused vector the store searched with [D],
    and the model's query parts (reference, text and description terms, attribute rows, texts)."""

    vector: np.ndarray
    parts: QueryParts | None = None


class Rescorer(Protocol):
    def scores(self, query: RescoreQuery, ids: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """One score per candidate (higher is better); ``rows`` are their stored raw rows [N, width]."""
        ...


class ExactScorer:
    """The model's fused score, exact: the query vector times the item vectors of the stored float32
    rows (the image block normalised, :func:`~fashion_cir.retrieval.store.item_vectors`)."""

    def __init__(self, config: Mapping[str, Any]):
        self.config = config

    def scores(self, query: RescoreQuery, ids: Sequence[str], rows: np.ndarray) -> np.ndarray:
        return item_vectors(rows, self.config) @ np.asarray(query.vector, dtype=np.float32)


def check_candidates(candidates: int, k: int) -> None:
    """Refuse a candidate set smaller than the results asked for."""
    if candidates < k:
        raise DataError(
            f"candidates ({candidates}) must be at least the results asked for ({k}): the second stage "
            "only reorders what the store found; raise candidates or lower k"
        )


def two_stage_search(
    store: CatalogStore,
    query: RescoreQuery,
    k: int,
    candidates: int,
    exclude: Iterable[str] = (),
    filter: Filter | None = None,
    rescorer: Rescorer | None = None,
) -> list[SearchHit]:
    """The top ``k`` of the store's ``candidates`` best items for ``query`` (those that pass
    ``filter`` and are not in ``exclude``), ordered by ``rescorer`` (default :class:`ExactScorer`);
    ties keep the store's order. Hits carry the second scorer's scores."""
    check_candidates(candidates, k)
    pool = store.search_vectors(np.asarray(query.vector, dtype=np.float32)[None], candidates, exclude, filter)[0]
    if not pool:
        return []
    ids = [hit.id for hit in pool]
    scores = (rescorer or ExactScorer(store.config)).scores(query, ids, store.stored_rows(ids))
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return [SearchHit(pool[i].id, float(scores[i]), pool[i].metadata) for i in order]
