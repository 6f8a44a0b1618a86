"""Reading a relative caption as attribute changes: "is navy with grey stripes and no hood" ->
wanted color navy, secondary_color grey, pattern striped; unwanted neckline hood. Values named
after a negation ("no", "without", "instead of", "not") are unwanted; a colour right before a
detail noun ("grey stripes") is the secondary colour; "shorter"/"longer" are relative lengths (of
the sleeves before "sleeves") and "darker"/"lighter" relative colours.
The words are :mod:`.lexicon`'s."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .lexicon import DETAIL_NOUNS, GENERIC_PATTERNS, NEGATIONS, PHRASES, RELATIVE_WORDS, SCOPE_ENDS, SLEEVE_WORDS

_PUNCTUATION = re.compile(r"[,.;:!?()\"]")
_PHRASES = sorted(
    ((tuple(p.split()), name, value) for name, table in PHRASES.items() for p, value in table.items()),
    key=lambda entry: -len(entry[0]),
)
_NEGATIONS = sorted((tuple(n.split()) for n in NEGATIONS), key=len, reverse=True)
_LONGEST = max(len(p) for p, _, _ in _PHRASES)


@dataclass
class Changes:
    """What a caption asks of the target, per attribute: values wanted, values unwanted, and a
    relation to the reference's value ("<": a lower level, shorter or darker; ">": longer or lighter)."""

    wanted: dict[str, list[str]] = field(default_factory=dict)
    unwanted: dict[str, list[str]] = field(default_factory=dict)
    relative: dict[str, str] = field(default_factory=dict)

    @property
    def mentioned(self) -> set[str]:
        """Attributes the caption says anything about (the rest should stay as the reference's)."""
        return set(self.wanted) | set(self.unwanted) | set(self.relative)

    def add(self, side: dict[str, list[str]], name: str, value: str) -> None:
        values = side.setdefault(name, [])
        if value not in values:
            values.append(value)


def tokens(text: str) -> list[str]:
    """Lower-case words; hyphens split words ("v-neck" -> "v neck"), punctuation becomes ","."""
    text = _PUNCTUATION.sub(" , ", text.lower().replace("-", " ").replace("_", " "))
    return text.split()


@dataclass
class _Mention:
    start: int
    end: int
    name: str
    value: str
    negated: bool


def _mentions(words: list[str]) -> tuple[list[_Mention], set[int]]:
    """Attribute phrases in reading order (longest match first), each marked negated when a
    negation's scope covers it (from the negation to a comma or a scope-ending word), and the
    positions of words that phrases and negations used."""
    found: list[_Mention] = []
    used: set[int] = set()
    negated = False
    i = 0
    while i < len(words):
        word = words[i]
        if word == "," or word in SCOPE_ENDS:
            negated = False
            i += 1
            continue
        window = tuple(words[i : i + _LONGEST])
        match = next(((p, name, value) for p, name, value in _PHRASES if window[: len(p)] == p), None)
        negation = next((n for n in _NEGATIONS if window[: len(n)] == n), None)
        if match is None and negation is not None:  # a phrase that starts with one ("no sleeves") wins
            negated = True
            used.update(range(i, i + len(negation)))
            i += len(negation)
            continue
        if match is None:
            i += 1
            continue
        phrase, name, value = match
        found.append(_Mention(i, i + len(phrase), name, value, negated and negation is None))
        negated = negated or negation is not None  # "no sleeves or leather": the scope goes on
        used.update(range(i, i + len(phrase)))
        i += len(phrase)
    return found, used


def _is_detail_colour(mention: _Mention, words: list[str]) -> bool:
    """A colour followed (within two words of its clause) by a detail noun: "grey stripes", "white
    brand text", but not "white with buttons"."""
    for word in words[mention.end : mention.end + 2]:
        if word == "," or word in SCOPE_ENDS:
            return False
        if word in DETAIL_NOUNS:
            return True
    return False


def read_changes(caption: str) -> Changes:
    """The attribute changes ``caption`` asks for (see the module docstring)."""
    words = tokens(caption)
    changes = Changes()
    mentions, used = _mentions(words)
    specific_pattern = any(
        m.name == "pattern" and not m.negated and " ".join(words[m.start : m.end]) not in GENERIC_PATTERNS
        for m in mentions
    )
    main_colour_seen = False
    for mention in mentions:
        name, value = mention.name, mention.value
        if (
            name == "pattern"
            and specific_pattern
            and not mention.negated
            and " ".join(words[mention.start : mention.end]) in GENERIC_PATTERNS
        ):
            continue  # "camo print": the specific word says it
        if name == "color" and not mention.negated:
            if _is_detail_colour(mention, words) or main_colour_seen:
                name = "secondary_color"
            main_colour_seen = main_colour_seen or name == "color"
        changes.add(changes.unwanted if mention.negated else changes.wanted, name, value)
    if "pattern" in changes.unwanted and "pattern" not in changes.wanted:
        changes.add(changes.wanted, "pattern", "solid")  # "no stripes": plain
    for position, word in enumerate(words):
        if word in RELATIVE_WORDS and position not in used:
            name, relation = RELATIVE_WORDS[word]
            if name == "length" and position + 1 < len(words) and words[position + 1] in SLEEVE_WORDS:
                name = "sleeves"  # "longer sleeves"
            if name not in changes.wanted:
                changes.relative[name] = relation
    return changes
