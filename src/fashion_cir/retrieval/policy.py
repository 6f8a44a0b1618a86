"""The one query policy: where a reference's description and attributes come from, and what a
catalog item is made of. Training data, evaluation, pictures, the command line and the service
all resolve references here.

A reference's description and attributes are ``catalog`` (the item's own MLLM record; an upload
the MLLM described at search time has its own record too, source ``captioned``; an item without
one, or an upload without one, falls back to the model's attribute heads when it has them),
``predicted`` (always the attribute heads') or ``none``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from ..errors import ModelError
from ..models.attributes import describe
from ..models.cir import CIRModel
from ..models.matcher import DescriptionBank

Source = Literal["catalog", "predicted", "none"]
SOURCES: tuple[str, ...] = get_args(Source)


@dataclass(frozen=True)
class ReferencePolicy:
    source: Source = "catalog"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ModelError(f"unknown reference description source {self.source!r}; choose one of {SOURCES}")


CATALOG = ReferencePolicy("catalog")  # what search uses: the catalog's record; the MLLM's or predicted for an upload


@dataclass
class Reference:
    """What a query knows of its reference besides the pixels."""

    description: str | None
    attributes: dict[str, Any] | None  # catalog values, or predicted {"value", "confidence"}
    source: str  # catalog | captioned | predicted | none


def resolve_references(
    model: CIRModel,
    policy: ReferencePolicy,
    ids: Sequence[str | None],
    image_features: torch.Tensor | None,
    records: Mapping[str, Mapping[str, Any]] | None,
    prompts: Sequence[str | None] | None = None,
    uploads: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[Reference]:
    """One :class:`Reference` per query: ``ids`` are catalog ids (None: an upload), ``image_features``
    the references' raw features [n, d] (None: queries without a reference). Under the ``catalog``
    policy, ``prompts`` (a triplet's own ``reference_prompt``) replace descriptions where given, and
    ``uploads`` holds per query the record the MLLM gave an upload at search time (or None)."""
    records = records or {}
    out: list[Reference | None] = [None] * len(ids)
    predict: list[int] = []
    for row, item_id in enumerate(ids):
        record = records.get(item_id) if item_id is not None else (uploads[row] if uploads else None)
        if image_features is None or policy.source == "none":
            out[row] = Reference(None, None, "none")
        elif policy.source == "catalog" and record:
            description = record.get("description") if isinstance(record.get("description"), str) else None
            out[row] = Reference(description or None, dict(record), "catalog" if item_id is not None else "captioned")
        elif model.attribute_heads is not None:
            predict.append(row)
        else:
            out[row] = Reference(None, None, "none")
    if predict and image_features is not None:
        predicted = model.predict_attributes(image_features[predict])
        for row, attributes in zip(predict, predicted):
            out[row] = Reference(describe(attributes), attributes, "predicted")
    resolved = [r for r in out if r is not None]
    if prompts is not None and policy.source == "catalog":
        resolved = [Reference(p or r.description, r.attributes, r.source) for p, r in zip(prompts, resolved)]
    return resolved


def item_parts(
    model: CIRModel, ids: Sequence[str], records: Mapping[str, Mapping[str, Any]] | None, cache_root: str | Path | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What items are besides their pixels, as the model reads them: description features (cached
    under ``cache_root``) and attribute one-hots, from ``records`` (None where the model reads neither)."""
    records = records or {}
    described = attributes = None
    if model.matcher is not None:
        texts = [records.get(i, {}).get("description") for i in ids]
        described = DescriptionBank(cache_root).features(
            model.matcher, [t if isinstance(t, str) else None for t in texts]
        )
    if model.attribute_space is not None:
        attributes = model.attribute_space.one_hot([records.get(i) for i in ids])
    return described, attributes


def catalog_items(
    model: CIRModel,
    image_features: torch.Tensor,
    ids: Sequence[str],
    records: Mapping[str, Mapping[str, Any]] | None,
    cache_root: str | Path | None,
) -> torch.Tensor:
    """Item vectors of catalog items (see :func:`item_parts`)."""
    with torch.no_grad():
        return model.item_vectors(image_features.float(), *item_parts(model, ids, records, cache_root))
