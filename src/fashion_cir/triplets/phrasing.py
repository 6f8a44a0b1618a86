"""Relative captions in FashionIQ style from an attribute difference, drawn from a varied template
bank: per-attribute clauses ("is red instead of white", "has long sleeves and a hood"), noun phrases
built from the target ("is a black polo shirt"), SPN4CIR's "{tgt} instead of {ref}" and
"Unlike the white one, I want red", and the target's own description. A caption only ever states
target values, and names reference values only after a contrast word (instead of, not, no, unlike).
Values without a phrase here (a custom vocabulary) are described by their vocabulary name."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..captioning.schema import Attributes
from ..language.lexicon import LENGTH_ORDER, LIGHTNESS, SLEEVE_ORDER, moved

PLURAL_CATEGORIES = {"pants", "shorts", "shoes"}
# value -> the words a caption may use for it, per table (data: ``wording.json``, read once)
WORDING: dict[str, dict[str, list[str]]] = json.loads((Path(__file__).parent / "wording.json").read_text("utf-8"))
NOUNS = WORDING["nouns"]
COLORS = WORDING["colors"]
PATTERN_ADJ = WORDING["pattern_adjectives"]
PATTERN_NOUN = WORDING["pattern_nouns"]
SLEEVE_ADJ = WORDING["sleeve_adjectives"]
SLEEVE_NOUN = WORDING["sleeve_nouns"]
NECK_NOUN = WORDING["neckline_nouns"]
LENGTH_ADJ = WORDING["length_adjectives"]
MATERIAL_ADJ = WORDING["material_adjectives"]
CLOSURE_NOUN = WORDING["closure_nouns"]
MADE_OF = {"denim", "cotton", "leather", "fleece", "wool", "lace", "satin"}
CONTRAST = ["instead of", "rather than"]
Changes = dict[str, tuple[str | None, str | None]]  # attribute -> (reference value, target value)


def _pick(table: dict[str, list[str]], value: str | None, rng: random.Random) -> str:
    """One of the words for ``value`` (the value itself when the table has none)."""
    return rng.choice(table.get(str(value), [str(value)]))


def _bare(noun: str) -> str:
    """'a hood' -> 'hood' (for "no hood")."""
    for article in ("a ", "an "):
        if noun.startswith(article):
            return noun[len(article) :]
    return noun


def _have_instead(s, new: str, old: str, contrast: str, rng, *more: str) -> str:
    """ "has a hood", "has a hood instead of a collar", or one of ``more``."""
    return rng.choice([f"{s.have} {new}", f"{s.have} {new} {contrast} {old}", *more])


def _comparative(name: str, old: str | None, new: str | None) -> str:
    """ "longer" or "shorter": where ``new`` lies from ``old`` in ``name``'s order (both in it)."""
    return "longer" if moved(name, ">", old, new) else "shorter"


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


class _Subject:
    """Verb forms agreeing with the target ("is"/"has", or "are"/"have" for pants, shorts, shoes)."""

    def __init__(self, target: Attributes):
        plural = target["category"] in PLURAL_CATEGORIES
        self.be, self.have, self.it = ("are", "have", "them") if plural else ("is", "has", "it")


def _clause(name: str, old: str | None, new: str | None, target: Attributes, s: _Subject, rng: random.Random) -> str:
    """One clause, starting with its verb, stating ``name`` went from ``old`` to ``new``."""
    contrast = rng.choice(CONTRAST)
    if name == "color":
        t, f = _pick(COLORS, new, rng), _pick(COLORS, old, rng)
        return rng.choice(
            [
                f"{s.be} {t}",
                f"{s.be} {t} {contrast} {f}",
                f"{s.be} {t}, not {f}",
                f"{s.be} in {t}",
                f"comes in {t} {contrast} {f}" if s.be == "is" else f"come in {t} {contrast} {f}",
            ]
        )
    if name == "secondary_color":
        if new is None and old == target["color"]:
            return f"{s.be} all {_pick(COLORS, old, rng)}"
        if new is None:
            return rng.choice(
                [f"{s.have} no {_pick(COLORS, old, rng)} details", f"{s.have} no {_pick(COLORS, old, rng)} on {s.it}"]
            )
        t = _pick(COLORS, new, rng)
        options = [f"{s.have} {t} details", f"{s.have} {t} accents", f"{s.have} some {t} on {s.it}"]
        if old is not None:
            options.append(f"{s.have} {t} accents {contrast} {_pick(COLORS, old, rng)}")
        return rng.choice(options)
    if name == "pattern":
        if new == "solid":
            f_noun = _bare(_pick(PATTERN_NOUN, old, rng))
            return rng.choice(
                [
                    f"{s.be} {_pick(PATTERN_ADJ, 'solid', rng)}",
                    f"{s.have} no {f_noun}",
                    f"{s.be} plain with no {f_noun}",
                    f"{s.be} solid {contrast} {_pick(PATTERN_ADJ, old, rng)}"
                    if old in PATTERN_ADJ
                    else f"{s.be} plain",
                ]
            )
        t_noun = _pick(PATTERN_NOUN, new, rng)
        if old == "solid":
            options = [f"{s.have} {t_noun}", f"{s.have} {t_noun} instead of being plain"]
            if new in PATTERN_ADJ:
                options += [
                    f"{s.be} {_pick(PATTERN_ADJ, new, rng)}",
                    f"{s.be} {_pick(PATTERN_ADJ, new, rng)} {contrast} plain",
                ]
            return rng.choice(options)
        options = [
            f"{s.have} {t_noun} {contrast} {_pick(PATTERN_NOUN, old, rng)}",
            f"{s.have} {t_noun} and no {_bare(_pick(PATTERN_NOUN, old, rng))}",
        ]
        if new in PATTERN_ADJ and old in PATTERN_ADJ:
            options.append(f"{s.be} {_pick(PATTERN_ADJ, new, rng)} {contrast} {_pick(PATTERN_ADJ, old, rng)}")
        return rng.choice(options)
    if name == "sleeves":
        t_noun = _pick(SLEEVE_NOUN, new, rng)
        if new == "sleeveless":
            return rng.choice([f"{s.be} sleeveless", f"{s.have} no sleeves"])
        if old == "sleeveless":
            return rng.choice(
                [
                    f"{s.have} {t_noun}",
                    f"{s.have} {t_noun} instead of being sleeveless",
                    f"{s.be} {_pick(SLEEVE_ADJ, new, rng)}",
                ]
            )
        options = [
            f"{s.have} {t_noun}",
            f"{s.be} {_pick(SLEEVE_ADJ, new, rng)}",
            f"{s.have} {t_noun} {contrast} {_pick(SLEEVE_NOUN, old, rng)}",
        ]
        if new in SLEEVE_ORDER and old in SLEEVE_ORDER:  # custom vocabularies may hold other lengths
            longer = _comparative("sleeves", old, new)
            options.append(f"{s.have} {longer} sleeves")
        return rng.choice(options)
    if name == "neckline":
        neck = None if new == "strapless" else _pick(NECK_NOUN, new, rng)
        if neck is None:
            return f"{s.be} strapless"
        if old == "strapless":
            return rng.choice([f"{s.have} {neck}", f"{s.have} {neck} instead of being strapless"])
        f = _pick(NECK_NOUN, old, rng)
        return _have_instead(s, neck, f, contrast, rng, f"{s.have} {neck} and no {_bare(f)}")
    if name == "length":
        if new in LENGTH_ORDER and old in LENGTH_ORDER:
            longer = _comparative("length", old, new)
            return rng.choice(
                [
                    f"{s.be} {longer}",
                    f"{s.be} {_pick(LENGTH_ADJ, new, rng)}",
                    f"{s.be} {longer} and {_pick(LENGTH_ADJ, new, rng)}",
                    f"{s.be} {_pick(LENGTH_ADJ, new, rng)} {contrast} {_pick(LENGTH_ADJ, old, rng)}",
                ]
            )
        return f"{s.be} {_pick(LENGTH_ADJ, new, rng)}"
    if name == "material":
        t, f = _pick(MATERIAL_ADJ, new, rng), _pick(MATERIAL_ADJ, old, rng)
        options = [f"{s.be} {t}", f"{s.be} {t} {contrast} {f}", f"{s.be} {t}, not {f}"]
        if new in MADE_OF:
            options.append(f"{s.be} made of {new}")
        return rng.choice(options)
    if name == "closure":
        if new == "none":
            return f"{s.have} no {_bare(_pick(CLOSURE_NOUN, old, rng))}"
        t = _pick(CLOSURE_NOUN, new, rng)
        return f"{s.have} {t}" if old == "none" else _have_instead(s, t, _pick(CLOSURE_NOUN, old, rng), contrast, rng)
    if name == "category":
        t = _pick(NOUNS, new, rng)
        f = _pick(NOUNS, old, rng)
        t_np = t if new in PLURAL_CATEGORIES else _article(t)
        f_np = f if old in PLURAL_CATEGORIES else _article(f)
        return rng.choice([f"{s.be} {t_np}", f"{s.be} {t_np} {contrast} {f_np}", f"{s.be} {t_np}, not {f_np}"])
    return rng.choice(
        [f"{s.have} {name.replace('_', ' ')} {new}", f"{s.have} {name.replace('_', ' ')} {new} {contrast} {old}"]
    )


def _join(clauses: list[str], rng: random.Random) -> str:
    """ "is red and striped" / "has long sleeves and a hood": a repeated leading verb is dropped."""
    parts = [clauses[0]]
    for clause in clauses[1:]:
        previous_verb, verb = parts[-1].split(" ", 1)[0], clause.split(" ", 1)
        merge = (
            verb[0] == previous_verb
            and verb[0] in ("is", "are", "has", "have")
            and "," not in parts[-1]
            and rng.random() < 0.7
        )
        parts.append(verb[1] if merge and len(verb) > 1 else clause)
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _noun_phrase(item: Attributes, changes: Changes, rng: random.Random, only_changed: bool = False) -> str:
    """ "a red striped long-sleeved polo shirt": every changed attribute of ``item`` that has a positive
    adjective, plus (unless ``only_changed``) a random few unchanged ones; wildcards never appear."""

    def wanted(name: str) -> bool:
        return name in changes or (not only_changed and rng.random() < 0.35)

    words = []
    if wanted("color") and item["color"] is not None:
        words.append(_pick(COLORS, item["color"], rng))
    if wanted("pattern") and item["pattern"] in PATTERN_ADJ:
        words.append(_pick(PATTERN_ADJ, item["pattern"], rng))
    if wanted("length") and item["length"] == "cropped":
        words.append("cropped")
    if wanted("material") and item["material"] not in (None, "unknown", "synthetic"):
        words.append(_pick(MATERIAL_ADJ, item["material"], rng))
    if wanted("sleeves") and item["sleeves"] in SLEEVE_ADJ and item["category"] != "longsleeve":
        words.append(_pick(SLEEVE_ADJ, item["sleeves"], rng))
    noun = _pick(NOUNS, item["category"], rng)
    phrase = " ".join([*words, noun])
    return phrase if item["category"] in PLURAL_CATEGORIES else _article(phrase)


def _expressed_by_noun_phrase(name: str, item: Attributes) -> bool:
    value = item[name]
    return {
        "category": True,
        "color": True,
        "pattern": value in PATTERN_ADJ,
        "length": value == "cropped",
        "material": value not in ("unknown", "synthetic"),
        "sleeves": value in SLEEVE_ADJ and item["category"] != "longsleeve",
    }.get(name, False)


def relative_captions(reference: Attributes, target: Attributes, changes: Changes, rng: random.Random) -> list[str]:
    """Two different captions for reference -> target; the first states every change."""
    s = _Subject(target)
    names = list(changes)

    def clauses(subset: list[str]) -> str:
        order = rng.sample(subset, len(subset))
        return _join([_clause(n, *changes[n], target, s, rng) for n in order], rng)

    def noun_phrase(contrast: bool) -> str:
        leftover = [n for n in names if not _expressed_by_noun_phrase(n, target)]
        text = f"{s.be} {_noun_phrase(target, changes, rng)}"
        if contrast and any(
            _expressed_by_noun_phrase(n, reference) and _expressed_by_noun_phrase(n, target) for n in names
        ):
            text += f" {rng.choice(CONTRAST)} {_noun_phrase(reference, changes, rng, only_changed=True)}"
        if leftover:
            text += " and " + clauses(leftover)
        return text

    def unlike() -> str | None:
        if len(names) != 1 or names[0] not in ("color", "pattern", "material"):
            return None
        name = names[0]
        table = {"color": COLORS, "pattern": PATTERN_ADJ, "material": MATERIAL_ADJ}[name]
        old, new = changes[name]
        if name == "pattern" and (old not in PATTERN_ADJ or new not in PATTERN_ADJ):
            return None
        return rng.choice(
            [
                f"Unlike the {_pick(table, old, rng)} one, I want {_pick(table, new, rng)}",
                f"I want it {_pick(table, new, rng)} instead of {_pick(table, old, rng)}",
            ]
        )

    full = [
        lambda: clauses(names),
        lambda: clauses(names),
        lambda: noun_phrase(False),
        lambda: noun_phrase(True),
        unlike,
    ]
    partial = [
        lambda: clauses(rng.sample(names, rng.randint(1, len(names)))),
        lambda: noun_phrase(False),
        lambda: f"is {target.description}" if target.description.startswith(("a ", "an ")) else None,
        lambda: noun_phrase(True),
        unlike,
    ]
    first = None
    while first is None:
        first = rng.choice(full)()
    for _ in range(20):
        second = rng.choice(partial)()
        if second is not None and second != first:
            return [first, second]
    return [first, clauses(names)]


CHANGE_FRAMES = [
    "same but {}",
    "same one but {}",
    "{}",
    "{}",
    "make it {}",
    "I want it {}",
    "similar but {}",
    "{}, otherwise the same",
    "same style, {}",
]


def _lightness_move(old: str | None, new: str | None) -> str | None:
    """ "darker" / "lighter" when the colours are two or more lightness levels apart."""
    if old not in LIGHTNESS or new not in LIGHTNESS or abs(LIGHTNESS[new] - LIGHTNESS[old]) < 2:
        return None
    return "darker" if LIGHTNESS[new] < LIGHTNESS[old] else "lighter"


def _change(name: str, old, new, target: Attributes, rng: random.Random) -> str:
    """One change without a subject or verb ("in red", "with longer sleeves", "without the hood")."""
    contrast = rng.choice(CONTRAST)
    if name == "color":
        t, f = _pick(COLORS, new, rng), _pick(COLORS, old, rng)
        options = [f"in {t}", t, f"{t} {contrast} {f}", f"in {t}, not {f}"]
        move = _lightness_move(old, new)
        if move:
            options += [move, f"{move}, in {t}", f"in a {move} colour", f"{move} {t}"]
        return rng.choice(options)
    if name == "secondary_color":
        if new is None:
            return rng.choice([f"all {_pick(COLORS, target['color'], rng)}", f"without the {_pick(COLORS, old, rng)}"])
        t = _pick(COLORS, new, rng)
        return rng.choice([f"with {t} details", f"with {t} accents" if new == "multicolor" else f"with some {t}"])
    if name == "pattern":
        if new == "solid":
            return rng.choice(["plain", "solid", f"without the {_bare(_pick(PATTERN_NOUN, old, rng))}"])
        options = [f"with {_pick(PATTERN_NOUN, new, rng)}"]
        if new in PATTERN_ADJ:
            options.append(_pick(PATTERN_ADJ, new, rng))
            if old in PATTERN_ADJ:
                options.append(f"{_pick(PATTERN_ADJ, new, rng)} {contrast} {_pick(PATTERN_ADJ, old, rng)}")
        return rng.choice(options)
    if name == "sleeves":
        if new == "sleeveless":
            return rng.choice(["sleeveless", "with no sleeves"])
        options = [f"with {_pick(SLEEVE_NOUN, new, rng)}"]
        if new in SLEEVE_ORDER and old in SLEEVE_ORDER:
            longer = _comparative("sleeves", old, new)
            options += [f"with {longer} sleeves", f"{longer} sleeves"]
        return rng.choice(options)
    if name == "neckline":
        if new == "strapless":
            return "strapless"
        options = [f"with {_pick(NECK_NOUN, new, rng)}"]
        if old != "strapless":
            options += [
                f"with {_pick(NECK_NOUN, new, rng)} {contrast} {_pick(NECK_NOUN, old, rng)}",
                f"without the {_bare(_pick(NECK_NOUN, old, rng))}",
            ]
        return rng.choice(options)
    if name == "length":
        if new in LENGTH_ORDER and old in LENGTH_ORDER:
            longer = _comparative("length", old, new)
            return rng.choice([longer, f"{longer}, {_pick(LENGTH_ADJ, new, rng)}", f"a bit {longer}", f"much {longer}"])
        return _pick(LENGTH_ADJ, new, rng)
    if name == "material":
        t = _pick(MATERIAL_ADJ, new, rng)
        options = [t, f"in {t}", f"{t} {contrast} {_pick(MATERIAL_ADJ, old, rng)}"]
        return rng.choice(options)
    if name == "closure":
        if new == "none":
            return f"without the {_bare(_pick(CLOSURE_NOUN, old, rng))}"
        return f"with {_pick(CLOSURE_NOUN, new, rng)}"
    if name == "category":
        noun = _pick(NOUNS, new, rng)
        phrase = noun if new in PLURAL_CATEGORIES else _article(noun)
        return rng.choice([f"as {phrase}", f"{phrase} instead"])
    return f"with {name.replace('_', ' ')} {new}"


def change_only_captions(reference: Attributes, target: Attributes, changes: Changes, rng: random.Random) -> list[str]:
    """Two captions that say only what changes, the way a shopper refines a result ("same but
    darker", "with longer sleeves and no hood"): no garment type unless it changes, comparatives
    for ordered attributes (length, sleeves, colour lightness). The first states every change."""
    names = list(changes)

    def caption(subset: list[str]) -> str:
        parts = [_change(n, changes[n][0], changes[n][1], target, rng) for n in rng.sample(subset, len(subset))]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return rng.choice(CHANGE_FRAMES).format(body)

    first = caption(names)
    for _ in range(20):
        second = caption(rng.sample(names, rng.randint(1, len(names))))
        if second != first:
            return [first, second]
    return [first, first]
