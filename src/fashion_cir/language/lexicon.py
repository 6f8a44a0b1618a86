"""The words for attribute values, in one place: what a caption may say for a value (read by
:mod:`.changes`), and the orders that make "shorter", "longer", "darker" meaningful. Values are
those of the default vocabulary (:mod:`fashion_cir.captioning.vocab`)."""

from __future__ import annotations

import json
from pathlib import Path

LENGTH_ORDER = ("cropped", "hip", "thigh", "knee", "midi", "ankle", "full")
SLEEVE_ORDER = ("sleeveless", "short", "three-quarter", "long")

# phrase -> value, per attribute (data: ``phrases.json``); the reader tries longer phrases first
PHRASES: dict[str, dict[str, str]] = json.loads((Path(__file__).parent / "phrases.json").read_text("utf-8"))

GENERIC_PATTERNS = {"print", "printed", "design", "picture", "image", "graphic"}
# nouns that make a colour right before them a detail's colour, not the garment's ("grey stripes")
DETAIL_NOUNS = {
    "stripe",
    "stripes",
    "print",
    "text",
    "logo",
    "logos",
    "lettering",
    "letters",
    "writing",
    "accent",
    "accents",
    "trim",
    "trims",
    "detail",
    "details",
    "detailing",
    "band",
    "bands",
    "panel",
    "panels",
    "sole",
    "soles",
    "collar",
    "cuffs",
    "cuff",
    "piping",
    "graphic",
    "graphics",
    "pattern",
    "dots",
    "flowers",
    "yoke",
    "shoulders",
    "sleeves",
    "straps",
    "strap",
    "laces",
    "buttons",
    "zip",
    "zipper",
    "pocket",
    "pockets",
    "hood",
    "lining",
    "design",
    "checks",
    "letter",
    "words",
    "border",
    "edges",
    "edging",
    "stitching",
    "toe",
    "heel",
}
# words that put the values after them out of the wanted target ("no hood", "instead of white")
NEGATIONS = ("instead of", "rather than", "no longer", "unlike", "without", "not", "no", "minus", "less")
# the end of a negation's scope
SCOPE_ENDS = {"and", "but", "with", "has", "have", "is", "are", "in"}
RELATIVE_WORDS = {"shorter": ("length", "<"), "longer": ("length", ">")}
