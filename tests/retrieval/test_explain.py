"""Why a result matches (retrieval/explain.py): relative moves (lengths, sleeves, lightness) count
only strictly."""

from __future__ import annotations

import itertools

from fashion_cir.language.lexicon import LENGTH_ORDER, LIGHTNESS
from fashion_cir.retrieval.explain import attribute_values, explain, requested_changes


def test_shorter_and_longer_need_a_different_length():
    """Issue 24 item 9: "shorter"/"longer" were satisfied by the reference's own length."""
    reference = {"category": "skirt", "color": "black", "length": "knee"}
    for text, length, satisfied in (
        ("is shorter", "knee", False),
        ("is shorter", "thigh", True),
        ("is shorter", "midi", False),
        ("is longer", "knee", False),
        ("is longer", "midi", True),
        ("is longer", "hip", False),
    ):
        wanted = requested_changes(text)
        word = text.split()[1]
        assert wanted == {"length": "<" if word == "shorter" else ">"}
        why = explain(wanted, reference, {"category": "skirt", "color": "black", "length": length})
        assert why == {
            "satisfied": [word] if satisfied else [],
            "missed": [] if satisfied else [word],
            "kept": ["skirt", "black"],
        }, (text, length)
    # every pair of lengths, against their places in the order; an unknown length satisfies neither
    for ref, got in itertools.product([*LENGTH_ORDER, None, "unknown"], repeat=2):
        known = ref in LENGTH_ORDER and got in LENGTH_ORDER
        for wanted, word in (("<", "shorter"), (">", "longer")):
            expected = known and (
                LENGTH_ORDER.index(got) < LENGTH_ORDER.index(ref)
                if wanted == "<"
                else LENGTH_ORDER.index(got) > LENGTH_ORDER.index(ref)
            )
            why = explain({"length": wanted}, {"length": ref}, {"length": got})
            assert why["satisfied"] == ([word] if expected else []), (ref, got, wanted)
            assert why["missed"] == ([] if expected else [word]), (ref, got, wanted)


def test_darker_lighter_and_sleeve_moves():
    reference = {"category": "shirt", "color": "blue", "sleeves": "short"}
    for text, item, satisfied, missed in (
        ("darker", {"color": "navy"}, ["darker"], []),
        ("darker", {"color": "red"}, [], ["darker"]),  # the same lightness as blue
        ("lighter", {"color": "white"}, ["lighter"], []),
        ("lighter", {"color": "black"}, [], ["lighter"]),
        ("longer sleeves", {"sleeves": "long"}, ["longer sleeves"], []),
        ("shorter sleeves", {"sleeves": "sleeveless"}, ["shorter sleeves"], []),
        ("shorter sleeves", {"sleeves": "long"}, [], ["shorter sleeves"]),
    ):
        why = explain(requested_changes(text), reference, {"category": "shirt", **item})
        assert (why["satisfied"], why["missed"]) == (satisfied, missed), (text, item)
    # every pair of colours against their lightness levels
    for ref, got in itertools.product([*LIGHTNESS, "multicolor"], repeat=2):
        known = ref in LIGHTNESS and got in LIGHTNESS
        darker = known and LIGHTNESS[got] < LIGHTNESS[ref]
        assert explain({"color": "<"}, {"color": ref}, {"color": got})["satisfied"] == (["darker"] if darker else [])


def test_satisfied_missed_and_kept_phrases_by_hand():
    wanted = requested_changes("is a floral v-neck dress in silk with long sleeves and shorter")
    assert wanted == {
        "pattern": "floral",
        "neckline": "v-neck",
        "category": "dress",
        "material": "satin",
        "sleeves": "long",
        "length": "<",
    }
    reference = {"category": "skirt", "color": "red", "pattern": "solid", "length": "knee", "closure": "zip"}
    item = {
        "category": "dress",
        "color": "red",
        "pattern": "floral",
        "neckline": "round",
        "material": "satin",
        "sleeves": "short",
        "length": "thigh",
    }
    assert explain(wanted, reference, item) == {
        "satisfied": ["floral", "dress", "satin", "shorter"],
        "missed": ["v-neck", "long sleeves"],
        "kept": ["red"],
    }
    assert explain({"length": ">"}, reference, {"length": "full"})["satisfied"] == ["longer"]
    assert explain({"length": "midi"}, reference, {"length": "knee"})["missed"] == ["midi length"]
    assert explain({"sleeves": "long", "length": "midi"}, None, {"sleeves": "long", "length": "midi"})["satisfied"] == [
        "long sleeves",
        "midi length",
    ]


def test_kept_lists_every_key_attribute_equal_to_the_reference_except_wildcards_and_asked_ones():
    both = {
        "category": "dress",
        "color": "none",
        "pattern": "unknown",
        "sleeves": "other",
        "neckline": "v-neck",
        "length": "knee",
        "material": "cotton",
        "closure": "zip",  # not a key attribute
    }
    assert explain({}, both, dict(both))["kept"] == ["dress", "v-neck", "knee length", "cotton"]
    assert explain({"color": "red"}, {**both, "color": "red"}, {**both, "color": "red"})["kept"] == [
        "dress",
        "v-neck",
        "knee length",
        "cotton",
    ]
    assert explain({}, {**both, "sleeves": "long"}, {**both, "sleeves": "long"})["kept"] == [
        "dress",
        "long sleeves",
        "v-neck",
        "knee length",
        "cotton",
    ]
    # no reference (an uploaded photo): nothing is kept, relative lengths are missed, absolute ones judged
    assert explain({"length": "<", "color": "red"}, None, {"color": "red", "length": "hip"}) == {
        "satisfied": ["red"],
        "missed": ["shorter"],
        "kept": [],
    }
    assert explain({}, {"category": None}, {})["kept"] == []


def test_attribute_values_reads_plain_and_predicted_entries():
    metadata = {
        "category": "dress",
        "color": {"value": "red", "confidence": 0.9},
        "secondary_color": {"value": "blue"},
        "closure": "zip",
        "kids": {"value": True, "confidence": 0.4},
        "brand": "ignored",
    }
    assert attribute_values(metadata) == {
        "category": "dress",
        "color": "red",
        "pattern": None,
        "sleeves": None,
        "neckline": None,
        "length": None,
        "material": None,
        "secondary_color": "blue",
        "closure": "zip",
        "kids": True,
    }
