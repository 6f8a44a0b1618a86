"""Attribute vocabularies: the one place that says which values each attribute may take, which
spellings are repaired to which value, which values mean "unknown", and which categories may change
into each other. Overridable per catalog from a JSON file (same shape as ``Vocabulary``)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

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
    def _check(self) -> "AttributeVocab":
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

_COLORS = (
    "black", "white", "grey", "beige", "brown", "red", "pink", "orange", "yellow", "green", "olive",
    "blue", "navy", "light blue", "purple", "multicolor",
)
_COLOR_SYNONYMS = {
    "gray": "grey", "charcoal": "grey", "silver": "grey", "cream": "beige", "tan": "beige", "khaki": "beige",
    "off white": "white", "ivory": "white", "maroon": "red", "burgundy": "red", "coral": "red",
    "magenta": "pink", "fuchsia": "pink", "mustard": "yellow", "gold": "yellow", "olive green": "olive",
    "navy blue": "navy", "dark blue": "navy", "sky blue": "light blue", "baby blue": "light blue",
    "violet": "purple", "lilac": "purple", "multicolored": "multicolor", "multi": "multicolor",
    "multicolour": "multicolor", "colorful": "multicolor",
}


class Vocabulary(BaseModel):
    """All attribute vocabularies of a catalog plus the category-compatibility groups used in mining."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attributes: dict[str, AttributeVocab]
    compatible_categories: tuple[tuple[str, ...], ...] = ()
    description_words: tuple[int, int] = (6, 16)

    @model_validator(mode="after")
    def _check(self) -> "Vocabulary":
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


DEFAULT_VOCABULARY = Vocabulary(
    attributes={
        "category": AttributeVocab(
            values=(
                "t-shirt", "longsleeve", "shirt", "polo", "blouse", "top", "undershirt", "dress", "skirt",
                "pants", "shorts", "outwear", "blazer", "hoodie", "sweater", "hat", "shoes", "body", "bag",
                "other",
            ),
            synonyms={
                "tee": "t-shirt", "tshirt": "t-shirt", "t shirt": "t-shirt", "long sleeve": "longsleeve",
                "long sleeve shirt": "longsleeve", "polo shirt": "polo", "button down": "shirt",
                "tank top": "top", "tank": "undershirt", "trousers": "pants", "jeans": "pants",
                "leggings": "pants", "jacket": "outwear", "coat": "outwear", "outerwear": "outwear",
                "jumper": "sweater", "pullover": "sweater", "cardigan": "sweater", "sneakers": "shoes",
                "boots": "shoes", "cap": "hat", "bodysuit": "body", "onesie": "body", "romper": "body",
            },
        ),
        "color": AttributeVocab(values=_COLORS, synonyms=_COLOR_SYNONYMS),
        "secondary_color": AttributeVocab(values=_COLORS, nullable=True, synonyms=_COLOR_SYNONYMS),
        "pattern": AttributeVocab(
            values=(
                "solid", "striped", "checked", "floral", "dotted", "graphic print", "text print", "camouflage",
                "animal print", "other",
            ),
            synonyms={
                "plain": "solid", "stripes": "striped", "plaid": "checked", "check": "checked",
                "gingham": "checked", "tartan": "checked", "flowers": "floral", "polka dot": "dotted",
                "polka dots": "dotted", "dots": "dotted", "graphic": "graphic print", "print": "graphic print",
                "text": "text print", "lettering": "text print", "logo": "text print", "camo": "camouflage",
                "leopard": "animal print", "zebra": "animal print",
            },
        ),
        "sleeves": AttributeVocab(
            values=("sleeveless", "short", "three-quarter", "long", "none"),
            synonyms={"short sleeves": "short", "long sleeves": "long", "3/4": "three-quarter", "no sleeves": "sleeveless"},
            wildcards=("none",),
        ),
        "neckline": AttributeVocab(
            values=("crew", "v-neck", "collar", "hood", "turtleneck", "scoop", "strapless", "none"),
            synonyms={
                "round": "crew", "crew neck": "crew", "crewneck": "crew", "round neck": "crew", "v": "v-neck",
                "collared": "collar", "hooded": "hood", "mock neck": "turtleneck", "high neck": "turtleneck",
                "scoop neck": "scoop",
            },
            wildcards=("none",),
        ),
        "length": AttributeVocab(
            values=("cropped", "hip", "thigh", "knee", "midi", "ankle", "full"),
            nullable=True,
            synonyms={"mini": "thigh", "maxi": "full", "floor": "full", "waist": "hip", "long": "full"},
            wildcards=(None,),
        ),
        "material": AttributeVocab(
            values=("denim", "knit", "cotton", "leather", "fleece", "wool", "puffer", "lace", "satin", "synthetic", "unknown"),
            synonyms={
                "jean": "denim", "knitted": "knit", "jersey": "cotton", "suede": "leather", "woolen": "wool",
                "quilted": "puffer", "down": "puffer", "silk": "satin", "polyester": "synthetic",
                "nylon": "synthetic",
            },
            wildcards=("unknown",),
        ),
        "closure": AttributeVocab(
            values=("zip", "buttons", "laces", "none", "unknown"),
            synonyms={"zipper": "zip", "zip-up": "zip", "button": "buttons", "button-up": "buttons", "lace-up": "laces"},
            wildcards=("unknown",),
        ),
    },
    compatible_categories=(
        ("t-shirt", "longsleeve", "polo", "shirt", "top", "undershirt", "blouse"),
        ("pants", "shorts"),
        ("dress", "skirt"),
        ("outwear", "blazer", "hoodie", "sweater"),
    ),
)


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """The default vocabulary, or one read from a JSON file (errors name the file and field)."""
    if path is None:
        return DEFAULT_VOCABULARY
    raw = read_json(path, "vocabulary file")
    try:
        return Vocabulary.model_validate(raw)
    except ValidationError as exc:
        raise DataError(f"invalid vocabulary file {path}: {exc}") from exc
