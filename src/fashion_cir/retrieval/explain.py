"""Why a result matches: the attribute changes a caption asks for ("is red with long sleeves" ->
color=red, sleeves=long; "is shorter" -> length below the reference's, "darker" -> a darker colour), and per result which of
them it satisfies and which attributes of the reference it kept."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..language.changes import read_changes
from ..language.lexicon import RELATIVE_PHRASES, moved

KEY_ATTRIBUTES = ("category", "color", "pattern", "sleeves", "neckline", "length", "material")
PHRASE_NAMES = {"sleeves": "{} sleeves", "length": "{} length", "neckline": "{}", "pattern": "{}", "material": "{}"}


def requested_changes(text: str) -> dict[str, str]:
    """Attribute -> value (or "<"/">" for a relative move: shorter, darker) that ``text`` asks for: the first value
    :func:`~fashion_cir.language.changes.read_changes` reads for each attribute."""
    changes = read_changes(text)
    return {**{name: values[0] for name, values in changes.wanted.items()}, **changes.relative}


def _satisfied(name: str, wanted: str, item: Mapping[str, Any], reference: Mapping[str, Any]) -> bool:
    value = item.get(name)
    if wanted in ("<", ">"):
        return moved(name, wanted, reference.get(name), value)
    return value == wanted


def phrase(name: str, value: Any) -> str:
    """'long sleeves', 'knee length', 'red', 'shorter', 'darker'."""
    if value in ("<", ">"):
        return RELATIVE_PHRASES[name, value]
    return PHRASE_NAMES.get(name, "{}").format(value)


def explain(
    requested: Mapping[str, str], reference: Mapping[str, Any] | None, item: Mapping[str, Any]
) -> dict[str, list[str]]:
    """``satisfied``/``missed``: requested changes the item has or lacks; ``kept``: key attributes
    not asked to change on which the item equals the reference (wildcards such as "none" skipped)."""
    reference = reference or {}
    satisfied = [phrase(n, v) for n, v in requested.items() if _satisfied(n, v, item, reference)]
    missed = [phrase(n, v) for n, v in requested.items() if not _satisfied(n, v, item, reference)]
    kept = [
        phrase(n, item.get(n))
        for n in KEY_ATTRIBUTES
        if n not in requested
        and item.get(n) not in (None, "none", "unknown", "other")
        and item.get(n) == reference.get(n)
    ]
    return {"satisfied": satisfied, "missed": missed, "kept": kept}


def attribute_values(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Plain attribute values of an item's metadata or of predicted attributes ({"value", "confidence"})."""
    out = {}
    for name in (*KEY_ATTRIBUTES, "secondary_color", "closure", "kids"):
        entry = metadata.get(name)
        out[name] = entry.get("value") if isinstance(entry, Mapping) else entry
    return out
