"""The words for attribute values, in one place: what a caption may say for a value (read by
:mod:`.changes`), and the orders that make "shorter", "longer", "darker" meaningful. Values are
those of the default vocabulary (:mod:`fashion_cir.captioning.vocab`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LENGTH_ORDER = ("cropped", "hip", "thigh", "knee", "midi", "ankle", "full")
SLEEVE_ORDER = ("sleeveless", "short", "three-quarter", "long")
# how light a colour is, 0 (black) to 6 (white): "darker" asks for a lower level, "lighter" for a higher one
LIGHTNESS: dict[str, float] = {
    "black": 0,
    "navy": 1,
    "brown": 1,
    "purple": 2,
    "olive": 2,
    "green": 2,
    "blue": 2,
    "red": 2,
    "grey": 3,
    "orange": 4,
    "pink": 4,
    "light blue": 4,
    "yellow": 5,
    "beige": 5,
    "white": 6,
}
# attribute -> value -> level, for the attributes a relative word moves
LEVELS: dict[str, Mapping[str, float]] = {
    "length": {v: i for i, v in enumerate(LENGTH_ORDER)},
    "sleeves": {v: i for i, v in enumerate(SLEEVE_ORDER)},
    "color": LIGHTNESS,
}

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
# a relative word -> (attribute, "<" lower level / ">" higher level); before "sleeves" it moves the sleeves
RELATIVE_WORDS = {
    "shorter": ("length", "<"),
    "longer": ("length", ">"),
    "darker": ("color", "<"),
    "lighter": ("color", ">"),
    "paler": ("color", ">"),
}
SLEEVE_WORDS = {"sleeve", "sleeves", "sleeved"}
# (attribute, relation) -> the words that say it, for explanations
RELATIVE_PHRASES = {
    ("length", "<"): "shorter",
    ("length", ">"): "longer",
    ("sleeves", "<"): "shorter sleeves",
    ("sleeves", ">"): "longer sleeves",
    ("color", "<"): "darker",
    ("color", ">"): "lighter",
}


def moved(name: str, relation: str, reference: Any, value: Any) -> bool:
    """Whether ``value`` of attribute ``name`` lies on ``relation``'s side of the reference's value
    ("<": lower level, e.g. shorter or darker); False where either has no level."""
    levels = LEVELS.get(name, {})
    if reference not in levels or value not in levels:
        return False
    here, there = levels[reference], levels[value]
    return there < here if relation == "<" else there > here
