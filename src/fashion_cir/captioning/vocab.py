"""Attribute vocabularies: the one place that says which values each attribute may take, which
spellings are repaired to which value, which values mean "unknown", and which categories may change
into each other. Overridable per catalog from a JSON file (same shape as ``Vocabulary``)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..config import describe_validation_error
from ..errors import DataError
from ..io import read_json

_SPACES = re.compile(r"[\s_\-]+")


def canonical(text: str) -> str:
    """Spelling-insensitive form used for matching: lower case, ``-``/``_``/spaces collapsed."""
    return _SPACES.sub(" ", text.strip().lower())


class AttributeVocab(BaseModel):
    """Allowed values of one categorical attribute. ``wildcards`` are values meaning "unknown / not
    applicable": they never count as a difference and are never described in a caption."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    values: tuple[str, ...]
    nullable: bool = False
    synonyms: dict[str, str] = {}
    wildcards: tuple[str | None, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> AttributeVocab:
        unknown = [v for v in self.synonyms.values() if v not in self.values]
        if unknown:
            raise ValueError(f"synonyms point to values not in the vocabulary: {unknown}")
        bad = [w for w in self.wildcards if w is not None and w not in self.values]
        if bad or (None in self.wildcards and not self.nullable):
            raise ValueError(f"wildcards must be allowed values: {bad or [None]}")
        return self

    def normalise(self, value: object) -> str | None:
        """The vocabulary value for ``value`` (case, spacing, synonyms repaired); ValueError if none."""
        if self.nullable and (value is None or (isinstance(value, str) and canonical(value) in _NULL_WORDS)):
            return None
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        key = canonical(value)
        lookup = {canonical(v): v for v in self.values}
        lookup.update({canonical(k): v for k, v in self.synonyms.items()})
        if key in lookup:
            return lookup[key]
        raise ValueError(f"{value!r} is not one of {list(self.values)}")


_NULL_WORDS = {"", "null", "none", "n/a", "na", "no"}


class Vocabulary(BaseModel):
    """All attribute vocabularies of a catalog plus the category-compatibility groups used in mining."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attributes: dict[str, AttributeVocab]
    compatible_categories: tuple[tuple[str, ...], ...] = ()
    description_words: tuple[int, int] = (6, 16)

    @model_validator(mode="after")
    def _check(self) -> Vocabulary:
        if "category" not in self.attributes:
            raise ValueError("the vocabulary needs a 'category' attribute")
        if "kids" in self.attributes or "description" in self.attributes:
            raise ValueError("'kids' and 'description' are built-in fields, not categorical attributes")
        categories = self.attributes["category"].values
        for group in self.compatible_categories:
            missing = [c for c in group if c not in categories]
            if missing:
                raise ValueError(f"compatible_categories names unknown categories {missing}")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.attributes)

    def category_group(self, category: str) -> int | None:
        """Index of the compatibility group holding ``category`` (None: only same-category pairs)."""
        for index, group in enumerate(self.compatible_categories):
            if category in group:
                return index
        return None

    def is_wildcard(self, attribute: str, value: str | None) -> bool:
        return value in self.attributes[attribute].wildcards


DEFAULT_VOCABULARY = Vocabulary.model_validate_json(
    (Path(__file__).parent / "fashion_vocabulary.json").read_text("utf-8")
)
"""The fashion vocabulary of the clothing catalog and FashionIQ (data: ``fashion_vocabulary.json``)."""


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """The default vocabulary, or one read from a JSON file (errors name the file and field)."""
    if path is None:
        return DEFAULT_VOCABULARY
    raw = read_json(path, "vocabulary file")
    try:
        return Vocabulary.model_validate(raw)
    except ValidationError as exc:
        raise DataError(describe_validation_error(exc, str(path), "vocabulary file")) from None
