"""``Attributes``: what a captioner says about one image, validated against a ``Vocabulary``.

Validation repairs what is unambiguous (key spelling, case, synonyms such as "gray" -> "grey",
"tee" -> "t-shirt", yes/no for kids) and rejects the rest with a message a model can act on."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from .vocab import Vocabulary, canonical

_KEY_SYNONYMS = {
    "colour": "color",
    "secondary colour": "secondary color",
    "second color": "secondary color",
    "type": "category",
    "sleeve": "sleeves",
    "sleeve length": "sleeves",
    "neck": "neckline",
    "fabric": "material",
    "for kids": "kids",
    "child": "kids",
    "children": "kids",
}
_TRUE = {"true", "yes", "y", "1"}
_FALSE = {"false", "no", "n", "0"}


class InvalidAnswer(ValueError):
    """A captioner answer that cannot be turned into ``Attributes`` (the message says why)."""


class Attributes(BaseModel):
    """Categorical attribute values (keys = the vocabulary's attribute names), kids flag, description."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    values: dict[str, str | None]
    kids: bool
    description: str

    def __getitem__(self, name: str) -> str | None:
        """The value of ``name``; None when it is not described (or not in this catalog's vocabulary)."""
        return self.values.get(name)

    def to_record(self, image_id: str) -> dict[str, Any]:
        """The flat attributes.jsonl layout: ``{"image", <attributes>, "kids", "description"}``."""
        return {"image": image_id, **self.values, "kids": self.kids, "description": self.description}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and canonical(value) in _TRUE | _FALSE:
        return canonical(value) in _TRUE
    raise InvalidAnswer(f"'kids' must be true or false, got {value!r}")


def validate_attributes(obj: Any, vocab: Vocabulary, description_words: tuple[int, int] = (3, 30)) -> Attributes:
    """Turn a decoded JSON object into ``Attributes``; raise ``InvalidAnswer`` listing every problem.
    The description may be a little outside the prompt's word range (``description_words`` bounds it)."""
    if not isinstance(obj, dict):
        raise InvalidAnswer(f"expected a JSON object, got {type(obj).__name__}")
    fields = {}
    for key, value in obj.items():
        name = canonical(str(key))
        name = _KEY_SYNONYMS.get(name, name).replace(" ", "_")
        fields[name] = value
    problems, values = [], {}
    for name, spec in vocab.attributes.items():
        if name not in fields and not spec.nullable:
            problems.append(f"missing '{name}'")
            continue
        try:
            values[name] = spec.normalise(fields.get(name))
        except ValueError as exc:
            problems.append(f"'{name}': {exc}")
    kids = False
    try:
        kids = _bool(fields.get("kids", False))
    except InvalidAnswer as exc:
        problems.append(str(exc))
    description = fields.get("description")
    if not isinstance(description, str) or not description.strip():
        problems.append("missing 'description'")
    else:
        description = " ".join(description.split()).rstrip(".")
        low, high = description_words
        if not low <= len(description.split()) <= high:
            problems.append(f"'description' must have {vocab.description_words[0]}-{vocab.description_words[1]} words")
    if problems:
        raise InvalidAnswer("; ".join(problems))
    return Attributes(values=values, kids=kids, description=description)
