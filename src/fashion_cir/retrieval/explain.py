"""Why a result matches: the attribute changes a caption asks for ("is red with long sleeves" ->
color=red, sleeves=long; "is shorter" -> length below the reference's), and per result which of
them it satisfies and which attributes of the reference it kept."""

from __future__ import annotations

import re
from typing import Any, Mapping

from ..captioning.vocab import DEFAULT_VOCABULARY, Vocabulary, canonical

KEY_ATTRIBUTES = ("category", "color", "pattern", "sleeves", "neckline", "length", "material")
LENGTH_ORDER = ["cropped", "hip", "thigh", "knee", "midi", "ankle", "full"]
RELATIVE = {"shorter": ("length", "<"), "longer": ("length", ">")}
# phrases beyond the vocabulary's values and synonyms
EXTRA_PHRASES = {
    "sleeves": {"long sleeves": "long", "long sleeved": "long", "long sleeve": "long", "short sleeves": "short",
                "short sleeved": "short", "short sleeve": "short", "sleeveless": "sleeveless", "no sleeves": "sleeveless",
                "three quarter sleeves": "three-quarter"},
    "neckline": {"v neck": "v-neck", "hood": "hood", "hooded": "hood", "collar": "collar", "turtleneck": "turtleneck",
                 "crew neck": "crew", "round neck": "crew", "scoop neck": "scoop", "strapless": "strapless"},
    "length": {"cropped": "cropped", "knee length": "knee", "midi": "midi", "maxi": "full", "mini": "thigh",
               "ankle length": "ankle", "floor length": "full"},
    "pattern": {"plain": "solid", "solid": "solid", "stripes": "striped", "polka dots": "dotted", "checked": "checked",
                "floral": "floral", "flowers": "floral"},
}
CONTRAST = re.compile(r"\b(?:instead of|rather than|not|unlike|no longer|than)\s+(?:the\s+|a\s+|an\s+)?[\w ]*?(?=,|\.|;| and | with |$)")
PHRASE_NAMES = {"sleeves": "{} sleeves", "length": "{} length", "neckline": "{}", "pattern": "{}", "material": "{}"}


def _phrases(vocab: Vocabulary) -> list[tuple[str, str, str]]:
    """(canonical phrase, attribute, value), longest phrases first."""
    table: dict[str, tuple[str, str]] = {}
    for name in ("category", "color", "pattern", "material"):
        spec = vocab.attributes.get(name)
        if spec is None:
            continue
        for value in spec.values:
            if not spec.wildcards or value not in spec.wildcards:
                table.setdefault(canonical(value), (name, value))
        for word, value in spec.synonyms.items():
            table.setdefault(canonical(word), (name, value))
    for name, phrases in EXTRA_PHRASES.items():
        for word, value in phrases.items():
            table[canonical(word)] = (name, value)
    table.pop("other", None)
    return sorted(((p, n, v) for p, (n, v) in table.items()), key=lambda t: -len(t[0]))


_TABLE = _phrases(DEFAULT_VOCABULARY)


def requested_changes(text: str) -> dict[str, str]:
    """Attribute -> value (or "<"/">" for a relative length) that ``text`` asks for. Values named
    after a contrast word ("instead of white", "not red") are what the shopper does not want."""
    clean = re.sub(r"[^\w\s]", " ", CONTRAST.sub(" ", canonical(text)))
    padded = f" {clean} "
    out: dict[str, str] = {}
    for phrase, name, value in _TABLE:
        if f" {phrase} " in padded and name not in out:
            out[name] = value
            padded = padded.replace(f" {phrase} ", " | ")
    for word, (name, relation) in RELATIVE.items():
        if re.search(rf"\b{word}\b", clean) and name not in out:
            out[name] = relation
    return out


def _satisfied(name: str, wanted: str, item: Mapping[str, Any], reference: Mapping[str, Any]) -> bool:
    value = item.get(name)
    if wanted in ("<", ">"):
        ref, got = reference.get(name), value
        if ref not in LENGTH_ORDER or got not in LENGTH_ORDER:
            return False
        delta = LENGTH_ORDER.index(got) - LENGTH_ORDER.index(ref)
        return delta < 0 if wanted == "<" else delta > 0
    return value == wanted


def phrase(name: str, value: Any) -> str:
    """'long sleeves', 'knee length', 'red', 'shorter'."""
    if value in ("<", ">"):
        return "shorter" if value == "<" else "longer"
    return PHRASE_NAMES.get(name, "{}").format(value)


def explain(requested: Mapping[str, str], reference: Mapping[str, Any] | None, item: Mapping[str, Any]) -> dict[str, list[str]]:
    """``satisfied``/``missed``: requested changes the item has or lacks; ``kept``: key attributes
    not asked to change on which the item equals the reference (wildcards such as "none" skipped)."""
    reference = reference or {}
    satisfied = [phrase(n, v) for n, v in requested.items() if _satisfied(n, v, item, reference)]
    missed = [phrase(n, v) for n, v in requested.items() if not _satisfied(n, v, item, reference)]
    kept = [phrase(n, item.get(n)) for n in KEY_ATTRIBUTES
            if n not in requested and item.get(n) not in (None, "none", "unknown", "other") and item.get(n) == reference.get(n)]
    return {"satisfied": satisfied, "missed": missed, "kept": kept}


def attribute_values(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Plain attribute values of an item's metadata or of predicted attributes ({"value", "confidence"})."""
    out = {}
    for name in (*KEY_ATTRIBUTES, "secondary_color", "closure", "kids"):
        entry = metadata.get(name)
        out[name] = entry.get("value") if isinstance(entry, Mapping) else entry
    return out
