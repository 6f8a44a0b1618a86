"""The one fusion path: how a query and a catalog item become one vector each, so that their inner
product is the query's score for the item (and any inner-product index searches it exactly).

An item is three blocks: its normalised image features, its description's features (the
description matcher's frozen encoder; zero without one) and its attributes, one-hot in
:class:`AttributeSpace` (zero when unknown). A query is a weighted sum of *terms*, each a vector
in one of those blocks:

- image block: ``composed`` (reference image + query text, in the model's query mode) and
  ``reference`` (the reference image alone);
- description block: ``caption`` (the caption alone), ``prompt`` (the reference's description
  joined with the caption) and ``reference_description`` (the reference's description alone);
- attribute block, per attribute: ``want`` (values the caption asks for), ``unwanted`` (values it
  rules out), ``keep`` (the reference's value, for attributes the caption does not mention) and
  ``away`` (the reference's value, for attributes the caption changes).

:class:`Fusion` holds the weights; ``score = sum(weight * term . item block)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from ..captioning.vocab import DEFAULT_VOCABULARY, Vocabulary
from ..config import Config
from ..language.changes import Changes
from ..language.lexicon import LEVELS, moved

IMAGE_TERMS = ("composed", "reference")
DESCRIPTION_TERMS = ("caption", "prompt", "reference_description")
EFFECTS = ("want", "unwanted", "keep", "away")
MATCHED_ATTRIBUTES = (
    "category",
    "color",
    "secondary_color",
    "pattern",
    "sleeves",
    "neckline",
    "length",
    "material",
    "closure",
)


class Fusion(Config):
    """Weights of a query's terms (see the module docstring); attribute terms are named
    ``EFFECT:ATTRIBUTE`` (``want:color``). The defaults are the plain composed query."""

    composed: float = 1.0
    reference: float = 0.0
    caption: float = 0.0
    prompt: float = 0.0
    reference_description: float = 0.0
    attributes: dict[str, float] = Field(default_factory=dict, description="EFFECT:ATTRIBUTE -> weight")

    def weight(self, term: str) -> float:
        return self.attributes.get(term, 0.0) if ":" in term else float(getattr(self, term))

    @classmethod
    def from_weights(cls, weights: Mapping[str, float]) -> Fusion:
        """A fusion from term -> weight (terms not named weigh 0)."""
        plain = {t: float(weights.get(t, 0.0)) for t in IMAGE_TERMS + DESCRIPTION_TERMS}
        return cls(**plain, attributes={t: float(w) for t, w in weights.items() if ":" in t})

    def weights(self) -> dict[str, float]:
        return {**{t: float(getattr(self, t)) for t in IMAGE_TERMS + DESCRIPTION_TERMS}, **self.attributes}


class AttributeSpace:
    """The attribute block's layout: per attribute of ``names``, one slot per vocabulary value and,
    for nullable attributes, one for "no value". Wildcards ("unknown", "none") get slots too (an
    item has them) but are never kept or wanted."""

    def __init__(self, vocabulary: Vocabulary = DEFAULT_VOCABULARY, names: Sequence[str] = MATCHED_ATTRIBUTES):
        self.vocabulary = vocabulary
        self.names = [n for n in names if n in vocabulary.attributes]
        self.values: dict[str, list[str | None]] = {}
        for name in self.names:
            spec = vocabulary.attributes[name]
            self.values[name] = [*spec.values, *([None] if spec.nullable else [])]
        self.slices = block_slices({name: len(values) for name, values in self.values.items()})
        self.dim = sum(len(values) for values in self.values.values())

    def terms(self) -> list[str]:
        return [f"{effect}:{name}" for name in self.names for effect in EFFECTS]

    def _slot(self, name: str, value: Any) -> int | None:
        values = self.values[name]
        return self.slices[name].start + values.index(value) if value in values else None

    def one_hot(self, records: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        """Items' attribute block [N, dim]: 1 at the value of each attribute the record has."""
        out = torch.zeros(len(records), self.dim)
        for row, record in enumerate(records):
            for name in self.names:
                slot = self._slot(name, plain_value(record[name])) if record and name in record else None
                if slot is not None:
                    out[row, slot] = 1.0
        return out

    def query_rows(self, reference: Mapping[str, Any] | None, changes: Changes) -> dict[str, torch.Tensor]:
        """Per attribute term (``EFFECT:ATTRIBUTE``), the query row [dim] for a reference's
        attributes (values, or predicted ``{"value", "confidence"}``; None: no reference) and the
        caption's changes. ``keep``/``away`` carry the reference value's confidence."""
        rows = {term: torch.zeros(self.dim) for term in self.terms()}
        for name in self.names:
            value, confidence = _value_and_confidence((reference or {}).get(name))
            wildcard = reference is None or self.vocabulary.is_wildcard(name, value) or value is None
            for wanted in changes.wanted.get(name, []):
                self._set(rows[f"want:{name}"], name, wanted, 1.0)
            for unwanted in changes.unwanted.get(name, []):
                self._set(rows[f"unwanted:{name}"], name, unwanted, 1.0)
            if name in changes.relative:  # "shorter", "darker": every value beyond the reference's
                for other in LEVELS.get(name, {}):
                    if moved(name, changes.relative[name], value, other):
                        self._set(rows[f"want:{name}"], name, other, confidence)
            if wildcard:
                continue
            if name not in changes.mentioned:
                self._set(rows[f"keep:{name}"], name, value, confidence)
            elif (name in changes.wanted or name in changes.relative) and value not in changes.wanted.get(name, []):
                self._set(rows[f"away:{name}"], name, value, confidence)
        return rows

    def _set(self, row: torch.Tensor, name: str, value: Any, weight: float) -> None:
        slot = self._slot(name, value)
        if slot is not None:
            row[slot] = weight


def plain_value(entry: Any) -> Any:
    """A value from a catalog record's field or a predicted ``{"value", "confidence"}``."""
    return entry.get("value") if isinstance(entry, Mapping) else entry


def _value_and_confidence(entry: Any) -> tuple[Any, float]:
    if isinstance(entry, Mapping):
        return entry.get("value"), float(entry.get("confidence", 1.0))
    return entry, 1.0


@dataclass
class QueryParts:
    """The encoded parts of ``n`` queries (any may be None: no reference, no text, no matcher).
    ``reference`` and ``text`` are raw image / text-tower features; ``caption``, ``prompt`` and
    ``reference_description`` are normalised description-space features; ``attributes`` maps
    attribute terms to rows [n, dim] of the attribute space."""

    reference: torch.Tensor | None
    text: torch.Tensor | None
    caption: torch.Tensor | None = None
    prompt: torch.Tensor | None = None
    reference_description: torch.Tensor | None = None
    attributes: dict[str, torch.Tensor] | None = None
    texts: tuple[str, ...] = ()

    def __len__(self) -> int:
        for part in (self.reference, self.text, self.caption):
            if part is not None:
                return len(part)
        return 0

    def to(self, device: torch.device | str) -> QueryParts:
        """The parts on ``device`` (where the model composes them)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return QueryParts(
            move(self.reference),
            move(self.text),
            move(self.caption),
            move(self.prompt),
            move(self.reference_description),
            None if self.attributes is None else {k: v.to(device) for k, v in self.attributes.items()},
            self.texts,
        )

    def select(self, rows: torch.Tensor | list[int]) -> QueryParts:
        """The parts of a subset of the queries."""
        index = torch.as_tensor(rows, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return QueryParts(
            pick(self.reference),
            pick(self.text),
            pick(self.caption),
            pick(self.prompt),
            pick(self.reference_description),
            None if self.attributes is None else {k: v[index] for k, v in self.attributes.items()},
            tuple(self.texts[i] for i in index.tolist()) if self.texts else (),
        )


def block_slices(dims: Mapping[str, int]) -> dict[str, slice]:
    """Where each block lies in an item row whose blocks have these widths, in this order."""
    out, start = {}, 0
    for name, dim in dims.items():
        out[name], start = slice(start, start + int(dim)), start + int(dim)
    return out


def item_blocks(
    image: torch.Tensor, description: torch.Tensor | None, attributes: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The item side, per block: normalised image features, then (when given) description and
    attribute features as they are."""
    blocks = {"image": F.normalize(image.float(), dim=-1)}
    if description is not None:
        blocks["description"] = description.float()
    if attributes is not None:
        blocks["attributes"] = attributes.float()
    return blocks


def term_block(term: str) -> str:
    if term in IMAGE_TERMS:
        return "image"
    return "description" if term in DESCRIPTION_TERMS else "attributes"


def fuse_terms(
    terms: Mapping[str, torch.Tensor], fusion: Fusion, dims: Mapping[str, int], n: int, like: torch.Tensor
) -> torch.Tensor:
    """One query vector per row: per block (in ``dims``' order), the weighted sum of its terms."""
    blocks = {name: like.new_zeros(n, dim) for name, dim in dims.items()}
    for term, vector in terms.items():
        weight = fusion.weight(term)
        if weight:
            block = term_block(term)
            blocks[block] = blocks[block] + weight * vector.to(like)
    return torch.cat(list(blocks.values()), dim=-1)
