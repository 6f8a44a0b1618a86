"""One composed search, end to end: the reference's features and description (the catalog's for
an item; for an upload the MLLM's when the service has one describe it, else predicted by the
model's attribute heads), the sentence-level query text,
the query vector, attribute filters (incl. "same type as the reference", combined with a filter
expression) run by the store, and one page of results with an exact "more" flag."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import DataError
from ..models.cir import CIRModel
from ..models.fusion import block_slices
from .filters import BoolOp, Compare, Filter, FilterError, Node, parse_filter
from .policy import CATALOG, Reference, ReferencePolicy, resolve_references
from .rescore import RescoreQuery, Rescorer, check_candidates, two_stage_search
from .store import CatalogStore, SearchHit


@dataclass
class SearchResult:
    hits: list[SearchHit]
    query_text: str
    description: str | None  # the reference description in the prompt (None: no prompt)
    prompt_source: str  # catalog | captioned | predicted | none
    reference_attributes: dict[str, Any]  # catalog or captioned values, or predicted {"value", "confidence"}
    filters: dict[str, list[str]] = field(default_factory=dict)
    offset: int = 0
    more: bool = False


@torch.no_grad()
def encode_reference_image(model: CIRModel, image: Image.Image) -> torch.Tensor:
    """Raw image features [1, d] of an uploaded reference image."""
    backbone = model.backbone
    pixels = backbone.preprocess(image.convert("RGB")).unsqueeze(0).to(backbone.device)
    return backbone.encode_images(pixels).float().cpu()


def attribute_filter(values: Mapping[str, list[str]], base: Filter | None = None) -> Filter | None:
    """``base`` and, per attribute, "one of these values" (e.g. {"category": ["dress"]})."""
    parts: list[Node] = [
        Compare(name, False, tuple(dict.fromkeys(str(v) for v in vals))) for name, vals in values.items() if vals
    ]
    if base is not None:
        parts.insert(0, base.root)
    if not parts:
        return None
    words = [f"{name} in {json.dumps(list(vals))}" for name, vals in values.items() if vals]
    text = " and ".join(([f"({base.text})"] if base is not None else []) + words)
    return Filter(text, parts[0] if len(parts) == 1 else BoolOp("and", tuple(parts)))


def composed_search(
    model: CIRModel,
    index: CatalogStore,
    image: Image.Image | None = None,
    item_id: str | None = None,
    text: str = "",
    k: int = 10,
    offset: int = 0,
    exclude_reference: bool = False,
    filters: Mapping[str, list[str]] | None = None,
    same_type: bool = False,
    filter: Filter | None = None,
    policy: ReferencePolicy = CATALOG,
    candidates: int | None = None,
    rescorer: Rescorer | None = None,
) -> SearchResult:
    """Reference (an uploaded ``image`` or a catalog ``item_id``) + relative ``text`` -> results
    ``offset`` .. ``offset + k`` that pass ``filter`` (a parsed expression), ``filters``
    (attribute -> allowed values) and, with ``same_type``, share the reference's category (the
    catalog's, or an upload's: the MLLM's or the predicted one). Without text the query is the reference image
    alone ("more like this"); without a reference, the text alone. ``candidates`` (0: off) makes it a
    two-stage search: the store finds that many items, ``rescorer`` (default: the exact fused score
    from the stored rows, :mod:`~fashion_cir.retrieval.rescore`) orders them; fewer than ``k`` is
    refused. None: the index's ``candidates`` setting, grown to the page asked for. The request is
    checked by :class:`SearchRequest` (RequestError), and run by :meth:`SearchRequest.run`."""
    request = SearchRequest(
        text=text,
        k=k,
        offset=offset,
        item_id=item_id,
        image=image is not None,
        filters=dict(filters or {}),
        same_type=same_type,
        exclude_reference=exclude_reference,
        candidates=candidates,
    )
    return request.run(model, index, image, filter, policy, rescorer)


def search(model: CIRModel, index: CatalogStore, **options: Any) -> list[SearchHit]:
    """The hits of :func:`composed_search` (which also pages, applies attribute filters and reports
    the prompt used): e.g. ``search(model, index, item_id="a", text="is red", k=5)``. The text side
    is ``model.query_text(text, the reference description)``: the catalog item's ``description``,
    or for an upload the one its attribute heads predict (the service can ask the MLLM instead)."""
    return composed_search(model, index, **options).hits


def _stored_description(index: CatalogStore, row: np.ndarray, reference: Reference) -> dict[str, torch.Tensor] | None:
    """A catalog reference's description features as its stored ``row`` holds them (the index
    encoded the same catalog description), so a search does not encode it again."""
    span = block_slices(index.config.get("blocks") or {}).get("description")
    if reference.source != "catalog" or not reference.description or span is None:
        return None
    return {reference.description: torch.from_numpy(row[span].copy())}


class RequestError(DataError):
    """A search request refused before any search runs; ``status`` is the HTTP status the API answers."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class SearchRequest(BaseModel):
    """One composed search as the API's ``/search`` and the CLI's ``search`` take it, validated
    here once: the text stripped, two references refused, and a request with neither a
    reference nor a text. A front end that needs more says so: ``reference_required`` (exactly one
    reference, the API) and ``text_required`` (a text unless ``similar``, the API; its message
    names ``max_text_chars``). The reference image's pixels travel apart from the request
    (``image`` says there is one); refusals are :class:`RequestError`."""

    model_config = ConfigDict(extra="forbid")

    text: str = ""
    k: int = Field(10, ge=1)
    offset: int = Field(0, ge=0)
    item_id: str | None = None  # a catalog item as the reference
    image: bool = False  # an image is the reference
    filter: str = ""  # a filter expression (parse_filter; blank: none)
    filters: dict[str, list[str]] = Field(default_factory=dict)  # attribute -> allowed values, e.g. category
    same_type: bool = False
    similar: bool = False  # more like this: the reference alone, the text is not used
    exclude_reference: bool = True
    candidates: int | None = Field(None, ge=0)  # two-stage search: None the index's setting, 0 off
    reference_required: bool = False
    text_required: bool = False
    max_text_chars: int | None = None

    @field_validator("text")
    @classmethod
    def _stripped(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _references_and_text(self) -> SearchRequest:
        if self.text_required and not self.text and not self.similar:
            limit = f" in 1 to {self.max_text_chars} characters" if self.max_text_chars else ""
            raise RequestError(f"text must not be empty: describe the change{limit}", 422)
        if self.max_text_chars is not None and len(self.text) > self.max_text_chars:
            raise RequestError(f"text is longer than {self.max_text_chars} characters", 422)
        if self.reference_required and self.image == (self.item_id is not None):
            raise RequestError("give exactly one reference: an uploaded 'image' file or a catalog 'id'")
        if self.image and self.item_id is not None:
            raise RequestError("give a reference image or a catalog id, not both")
        if not self.image and self.item_id is None and not self.text:
            raise RequestError("a query needs a reference (image or catalog id), a text, or both")
        return self

    @property
    def query_text(self) -> str:
        """The caption the search composes with (none for "more like this")."""
        return "" if self.similar else self.text

    def parsed_filter(self, fields: list[str] | None) -> Filter | None:
        """The filter expression parsed against ``fields`` (FilterError names what is wrong)."""
        return parse_filter(self.filter, fields) if self.filter.strip() else None

    def run(
        self,
        model: CIRModel,
        index: CatalogStore,
        image: Image.Image | None = None,
        filter: Filter | None = None,
        policy: ReferencePolicy = CATALOG,
        rescorer: Rescorer | None = None,
        upload_record: Mapping[str, Any] | None = None,
    ) -> SearchResult:
        """This search on ``index``: ``image`` is the reference image when :attr:`image` says there
        is one, ``filter`` the parsed :attr:`filter`, ``policy`` where the reference description
        comes from, ``upload_record`` what the MLLM said of the uploaded ``image`` (see
        :func:`~fashion_cir.retrieval.policy.resolve_references`). ``same_type`` with explicit categories is refused (FilterError): one of the
        two would silently override the other; an id not in ``index`` is a DataError. ``rescorer``
        orders a two-stage search's candidates (see :func:`composed_search`)."""
        if self.candidates:
            check_candidates(self.candidates, self.k)
        categories = [v for v in self.filters.get("category", []) if v]
        if self.same_type and categories:
            raise FilterError(
                f"same type as the reference cannot be combined with category {categories}: "
                "it keeps only the reference's own category; choose one of the two"
            )
        item_id, text = self.item_id, self.query_text
        if item_id is not None and item_id not in index:
            raise DataError(f"unknown catalog id {item_id!r}")
        row = None  # a catalog reference's stored row
        if image is not None and self.image:
            image_features = encode_reference_image(model, image)
        elif item_id is not None:
            row = np.array(index.vector(item_id), dtype=np.float32)
            image_features = torch.from_numpy(row[None, : int(index.config["feature_dim"])])
        else:
            image_features = None
        reference = resolve_references(
            model, policy, [item_id], image_features, index.metadata, uploads=[upload_record]
        )[0]
        attributes = reference.attributes or dict(index.metadata.get(item_id, {}) if item_id is not None else {})
        described = _stored_description(index, row, reference) if row is not None else None
        parts = model.encode_queries(
            image_features, [text], [reference.description], [reference.attributes], described=described
        )
        with torch.no_grad():
            query = model.query_vectors(parts)
        wanted = {name: [v for v in vals if v] for name, vals in self.filters.items() if any(vals)}
        if self.same_type:
            category = attributes.get("category")
            category = category.get("value") if isinstance(category, Mapping) else category
            if category:
                wanted["category"] = [str(category)]
        exclude = [item_id] if self.exclude_reference and item_id is not None else []
        end = self.offset + self.k
        # one extra hit says whether a further page exists
        vector, wanted_filter = query.float().cpu().numpy(), attribute_filter(wanted, filter)
        pool = index.config.get("candidates") if self.candidates is None else self.candidates
        if pool:
            query_of = RescoreQuery(vector[0], parts)
            hits = two_stage_search(index, query_of, end + 1, max(pool, end + 1), exclude, wanted_filter, rescorer)
        else:
            hits = index.search_vectors(vector, end + 1, exclude, wanted_filter)[0]
        return SearchResult(
            hits[self.offset : end],
            parts.texts[0] if text else "",
            reference.description,
            reference.source,
            attributes,
            wanted,
            self.offset,
            len(hits) > end,
        )
