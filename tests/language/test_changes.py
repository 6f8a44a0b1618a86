"""Reading a caption's attribute changes: values, negations, detail colours, relative lengths."""

import pytest

from fashion_cir.language.changes import read_changes, tokens


@pytest.mark.parametrize(
    "caption, wanted, unwanted, relative",
    [
        (
            "is navy with grey stripes and no hood",
            {"color": ["navy"], "secondary_color": ["grey"], "pattern": ["striped"]},
            {"neckline": ["hood"]},
            {},
        ),
        ("same but in maroon", {"color": ["red"]}, {}, {}),
        (
            "has no graphic and a v-neck",
            {"neckline": ["v-neck"], "pattern": ["solid"]},
            {"pattern": ["graphic print"]},
            {},
        ),
        ("has a grey camo print", {"secondary_color": ["grey"], "pattern": ["camouflage"]}, {}, {}),
        ("is white with buttons down the front", {"color": ["white"], "closure": ["buttons"]}, {}, {}),
        (
            "green padded with no sleeves or leather",
            {"color": ["green"], "material": ["puffer"], "sleeves": ["sleeveless"]},
            {"material": ["leather"]},
            {},
        ),
        ("is shorter with short sleeves", {"sleeves": ["short"]}, {}, {"length": "<"}),
        ("is darker blue and longer", {"color": ["navy"]}, {}, {"length": ">"}),
        ("same but darker", {}, {}, {"color": "<"}),
        ("lighter and shorter", {}, {}, {"color": ">", "length": "<"}),
        ("paler with no print", {"pattern": ["solid"]}, {"pattern": ["graphic print"]}, {"color": ">"}),
        ("has longer sleeves", {}, {}, {"sleeves": ">"}),
        ("shorter sleeved and longer", {}, {}, {"sleeves": "<", "length": ">"}),
        ("darker, in navy", {"color": ["navy"]}, {}, {}),
        ("is red instead of white", {"color": ["red"]}, {"color": ["white"]}, {}),
        ("is black and white", {"color": ["black"], "secondary_color": ["white"]}, {}, {}),
        (
            "is a pink knit sweater without a collar",
            {"color": ["pink"], "material": ["knit"], "category": ["sweater"]},
            {"neckline": ["collar"]},
            {},
        ),
    ],
)
def test_changes_of_captions(caption, wanted, unwanted, relative):
    changes = read_changes(caption)
    assert changes.wanted == wanted
    assert changes.unwanted == unwanted
    assert changes.relative == relative
    assert changes.mentioned == set(wanted) | set(unwanted) | set(relative)


def test_no_longer_is_a_negation_not_a_length():
    changes = read_changes("is no longer striped")
    assert changes.relative == {}
    assert changes.unwanted == {"pattern": ["striped"]} and changes.wanted == {"pattern": ["solid"]}


def test_a_comma_ends_a_negation():
    assert read_changes("no hood, red").wanted == {"color": ["red"]}
    assert read_changes("no hood red").unwanted == {"neckline": ["hood"], "color": ["red"]}


def test_words_without_attributes_change_nothing():
    changes = read_changes("looks more casual and relaxed")
    assert not changes.mentioned
    assert tokens("V-neck, long-sleeved!") == ["v", "neck", ",", "long", "sleeved", ","]
