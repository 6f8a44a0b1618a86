"""The filter grammar: parsing, evaluation on records and on columns, the Milvus translation, and
errors that name the offending token."""

from __future__ import annotations

import numpy as np
import pytest

from fashion_cir.retrieval.filters import (
    MAX_DEPTH,
    FilterError,
    field_text,
    filterable_fields,
    milvus_list,
    milvus_literal,
    parse_filter,
)

RECORDS = [
    {"category": "dress", "color": "red", "kids": False, "size": 38},
    {"category": "dress", "color": "black", "kids": True},
    {"category": "t-shirt", "color": None, "kids": False, "size": 2.5},
    {"category": "pants", "color": "it's \"blue\""},
]


@pytest.mark.parametrize("text, expected", [
    ('category == "dress"', [0, 1]),
    ('category == "dress" and color != "black"', [0]),
    ('category == "dress" or category == "pants"', [0, 1, 3]),
    ('not category == "dress"', [2, 3]),
    ('not (category == "dress" and kids == true)', [0, 2, 3]),
    ('category in ["pants", "t-shirt"] and not color in ["red"]', [2, 3]),
    ("color not in ['red', 'black']", [2, 3]),
    ('color == ""', [2]),  # null reads as empty text
    ('kids == false', [0, 2]),
    ('size == 38 or size == 2.5', [0, 2]),
    ("color == 'it\\'s \"blue\"'", [3]),
    ('CATEGORY_X == "a" or category == "dress" AND color == "red"', [0]),  # and binds tighter than or
])
def test_semantics_on_records_and_columns(text, expected):
    parsed = parse_filter(text)
    assert [n for n, r in enumerate(RECORDS) if parsed.matches(r)] == expected
    fields = {"category", "color", "kids", "size", "CATEGORY_X"}
    columns = {f: np.array([field_text(r.get(f)) for r in RECORDS], dtype=object) for f in fields}
    assert np.flatnonzero(parsed.mask(columns, len(RECORDS))).tolist() == expected


def test_milvus_translation():
    parsed = parse_filter("""category == "dress" and (color not in ['black', "say \\"hi\\""] or not kids == true)""")
    assert parsed.to_milvus("m_") == ('((m_category == "dress") and ((m_color not in ["black", "say \\"hi\\""]) '
                                      'or (not (m_kids == "true"))))')
    assert parse_filter("size in [1, 1.50]").to_milvus() == '(size in ["1", "1.5"])'


@pytest.mark.parametrize("text, message", [
    ('category = "dress"', "unexpected character '=' at position 10"),
    ('category == dress', "unexpected token 'dress', expected a quoted text"),
    ('category == "dress" and', "unexpected end, expected a field name"),
    ('(category == "dress"', "unexpected end, expected ')'"),
    ('category == "dress" color == "red"', "unexpected token 'color', expected 'and', 'or' or the end at position 21"),
    ('category in "dress"', "unexpected token '\"dress\"', expected '['"),
    ('category like "d%"', "unexpected token 'like', expected '==', '!=', 'in' or 'not in'"),
    ('== "x"', "unexpected token '==', expected a field name at position 1"),
    ('   ', "it is empty"),
])
def test_errors_name_the_token(text, message):
    with pytest.raises(FilterError, match="bad filter") as error:
        parse_filter(text)
    assert message in str(error.value)


def test_fields_are_checked_and_listed():
    with pytest.raises(FilterError, match=r"unknown field 'colour' \(filterable fields: category, color\)"):
        parse_filter('colour == "red"', ["category", "color"])
    assert filterable_fields([{"category": 1, "secondary color": 2}, {"in_stock": True}]) == ["category", "in_stock"]
    with pytest.raises(FilterError, match="too long"):
        parse_filter('a == "' + "x" * 3000 + '"')


@pytest.mark.parametrize("text, message", [
    ("size == 042", "bad number '042' (write 42, -7 or 0.5: no leading zeros) at position 9"),
    ("size == 00", "bad number '00'"),
    ("size in [1, -01.5]", "bad number '-01.5' (write 42, -7 or 0.5: no leading zeros) at position 13"),
])
def test_numbers_are_parsed_by_the_grammar(text, message):
    """Issue 22 item 3: ``042`` reached json.loads, whose JSONDecodeError was a 500."""
    with pytest.raises(FilterError) as error:
        parse_filter(text)
    assert message in str(error.value)
    assert parse_filter("size in [0, -0, 0.50, -7, 38]").root.values == ("0", "0.5", "-7", "38")


def test_nesting_is_limited_with_a_one_line_error():
    """Issue 22 item 3: ~330 nested parentheses (or ~200 ``not``) were a RecursionError, a 500."""
    for opening, closing, levels in (("(", ")", 1), ("not (", ")", 2), ("not ", "", 1)):
        repeats = MAX_DEPTH // levels  # exactly the limit: fine
        deep = opening * repeats + 'color == "red"' + closing * repeats
        assert parse_filter(deep).matches({"color": "red"}) == (opening.count("not") * repeats % 2 == 0)
        for too_deep in (repeats + 1, 330 // levels, (2000 - 14) // (len(opening) + len(closing))):
            text = opening * too_deep + 'color == "red"' + closing * too_deep  # inside the 2,000-character limit
            with pytest.raises(FilterError) as error:
                parse_filter(text)
            message = str(error.value)
            assert f"nested more than {MAX_DEPTH} levels deep (parentheses and 'not')" in message, message
            assert "\n" not in message and len(message) < 250


@pytest.mark.parametrize("character", ["\b", "\f", "\0", "\x1b", "\x7f", "\x85"])
def test_control_characters_are_refused(character):
    """Issue 22 item 3: raw control characters in a value became escapes Milvus cannot read (a 500)."""
    with pytest.raises(FilterError) as error:
        parse_filter(f'color == "re{character}d"')
    assert f"control character U+{ord(character):04X} at position 13; a filter is plain text" in str(error.value)
    assert parse_filter('color == "a\tb"\n and\r\n size == 1').matches({"color": "a\tb", "size": 1})


def test_milvus_literals_escape_what_milvus_reads():
    """Issue 22 item 2: ids and values are quoted with the escapes milvus-lite and Milvus both read."""
    assert milvus_literal("x'] or id not in ['") == '"x\'] or id not in [\'"'
    assert milvus_literal('a\\"b\n\r\t\0') == '"a\\\\\\"b\\n\\r\\t\0"'
    assert milvus_list(["a", 'b"']) == '["a", "b\\""]'
