"""How a query is scored, in one place: compose queries (reference features + relative caption +
reference description -> query vectors), make catalog item vectors, and rank a gallery with
exclusions. Evaluation, the index/service search, the training validation and the pictures all
call these; a vector store (:mod:`.store`) ranks the same vectors approximately at scale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..evaluation.metrics import target_ranks
from ..models.cir import CIRModel
from ..models.matcher import DescriptionBank


@dataclass
class ComposedQueries:
    """The parts of a batch of queries; :meth:`vectors` composes them in a query mode."""

    model: CIRModel
    image: torch.Tensor | None  # raw reference image features [n, d] (None: text-only queries)
    text: torch.Tensor | None  # text-tower features of ``texts`` (None: image-only queries)
    matched: torch.Tensor | None  # the description matcher's query features
    texts: list[str]  # the text-tower query texts (sentence-level prompt + caption)

    def vectors(self, mode: str | None = None) -> torch.Tensor:
        device = self.model.backbone.device  # a Combiner lives with the model; features come from the CPU
        with torch.no_grad():
            return self.model.query_vectors(None if self.image is None else self.image.to(device),
                                             None if self.text is None else self.text.to(device),
                                             self.matched, mode).float().cpu()


def compose_queries(model: CIRModel, image_features: torch.Tensor | None, captions: Sequence[str],
                    descriptions: Sequence[str | None] | None = None, batch_size: int = 256) -> ComposedQueries:
    """Queries from reference image features [n, d] (or None), relative captions (all empty: the
    reference image alone, "more like this") and each reference's description (None: none; the
    model's text template decides whether it enters the text)."""
    descriptions = list(descriptions) if descriptions is not None else [None] * len(captions)
    if len(descriptions) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(descriptions)} descriptions")
    has_text = any(c.strip() for c in captions)
    texts = [model.query_text(c, d) for c, d in zip(captions, descriptions)] if has_text else []
    text = matched = None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if has_text:
            text = model.backbone.embed_texts(texts, batch_size=batch_size)
            if model.matcher is not None:
                matched = model.matcher.embed([model.matcher.query_text(c, d) for c, d in zip(captions, descriptions)],
                                              side="query")
    model.train(was_training)
    return ComposedQueries(model, image_features, text, matched, texts)


def catalog_item_vectors(model: CIRModel, image_features: torch.Tensor, ids: Sequence[str],
                         descriptions: dict[str, str] | None, cache_root: str | Path) -> torch.Tensor:
    """Item vectors of a gallery: image features, plus each item's description when the model has
    a matcher (description features are cached under ``cache_root``)."""
    with torch.no_grad():
        if model.matcher is None:
            return model.item_vectors(image_features)
        bank = DescriptionBank(Path(cache_root))
        return model.item_vectors(image_features, bank.features(model.matcher, [(descriptions or {}).get(i) for i in ids]))


class DenseGallery:
    """An exact, in-memory gallery: item ids and their vectors [G, D]; ties go to the earlier item."""

    def __init__(self, ids: Sequence[str], vectors: torch.Tensor | np.ndarray):
        self.ids = list(ids)
        self.vectors = vectors.numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
        self.position = {item_id: i for i, item_id in enumerate(self.ids)}

    def scores(self, queries: torch.Tensor | np.ndarray) -> np.ndarray:
        queries = queries.numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
        return queries.astype(np.float32) @ self.vectors.astype(np.float32).T

    def target_ranks(self, queries: torch.Tensor | np.ndarray, targets: Sequence[str],
                     exclude: Sequence[str | None] | None = None) -> np.ndarray:
        """0-based rank of each query's target (``NOT_RETRIEVED`` when it is not in the gallery),
        with each query's ``exclude`` item (its reference) left out of the ranking."""
        target_index = np.array([self.position.get(t, -1) for t in targets], dtype=np.int64)
        exclude_index = None
        if exclude is not None:
            exclude_index = np.array([self.position.get(e, -1) if e is not None else -1 for e in exclude], dtype=np.int64)
        return target_ranks(self.scores(queries), target_index, exclude_index)

    def search(self, queries: torch.Tensor | np.ndarray, k: int,
               exclude: Iterable[Iterable[str]] | None = None) -> list[list[tuple[str, float]]]:
        """Top ``k`` (id, score) per query, each query's ``exclude`` ids left out."""
        scores = self.scores(queries)
        excluded = list(exclude) if exclude is not None else [()] * len(scores)
        results = []
        for row, left_out in zip(scores, excluded):
            left_out = set(left_out)
            order = [i for i in np.argsort(-row, kind="stable") if self.ids[i] not in left_out][:k]
            results.append([(self.ids[i], float(row[i])) for i in order])
        return results
