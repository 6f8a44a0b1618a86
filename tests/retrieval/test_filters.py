"""The filter grammar: parsing, evaluation on records and on columns, the Milvus translation, and
errors that name the offending token."""

from __future__ import annotations

import datetime

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
    {"category": "pants", "color": 'it\'s "blue"'},
]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('category == "dress"', [0, 1]),
        ('category == "dress" and color != "black"', [0]),
        ('category == "dress" or category == "pants"', [0, 1, 3]),
        ('not category == "dress"', [2, 3]),
        ('not (category == "dress" and kids == true)', [0, 2, 3]),
        ('category in ["pants", "t-shirt"] and not color in ["red"]', [2, 3]),
        ("color not in ['red', 'black']", [2, 3]),
        ('color == ""', [2]),  # null reads as empty text
        ("kids == false", [0, 2]),
        ("size == 38 or size == 2.5", [0, 2]),
        ("color == 'it\\'s \"blue\"'", [3]),
        ('CATEGORY_X == "a" or category == "dress" AND color == "red"', [0]),  # and binds tighter than or
    ],
)
def test_semantics_on_records_and_columns(text, expected):
    parsed = parse_filter(text)
    assert [n for n, r in enumerate(RECORDS) if parsed.matches(r)] == expected
    fields = {"category", "color", "kids", "size", "CATEGORY_X"}
    columns = {f: np.array([field_text(r.get(f)) for r in RECORDS], dtype=object) for f in fields}
    assert np.flatnonzero(parsed.mask(columns, len(RECORDS))).tolist() == expected


def test_milvus_translation():
    parsed = parse_filter("""category == "dress" and (color not in ['black', "say \\"hi\\""] or not kids == true)""")
    assert parsed.to_milvus("m_") == (
        '((m_category == "dress") and ((m_color not in ["black", "say \\"hi\\""]) or (not (m_kids == "true"))))'
    )
    assert parse_filter("size in [1, 1.50]").to_milvus() == '(size in ["1", "1.5"])'


@pytest.mark.parametrize(
    "text, message",
    [
        ('category = "dress"', "unexpected character '=' at position 10"),
        ("category == dress", "unexpected token 'dress', expected a quoted text"),
        ('category == "dress" and', "unexpected end, expected a field name"),
        ('(category == "dress"', "unexpected end, expected ')'"),
        (
            'category == "dress" color == "red"',
            "unexpected token 'color', expected 'and', 'or' or the end at position 21",
        ),
        ('category in "dress"', "unexpected token '\"dress\"', expected '['"),
        ('category like "d%"', "unexpected token 'like', expected '==', '!=', 'in' or 'not in'"),
        ('== "x"', "unexpected token '==', expected a field name at position 1"),
        ("   ", "it is empty"),
    ],
)
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


@pytest.mark.parametrize(
    "text, message",
    [
        ("size == 042", "bad number '042' (write 42, -7 or 0.5: no leading zeros) at position 9"),
        ("size == 00", "bad number '00'"),
        ("size in [1, -01.5]", "bad number '-01.5' (write 42, -7 or 0.5: no leading zeros) at position 13"),
    ],
)
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
    assert milvus_literal("x'] or id not in ['") == "\"x'] or id not in ['\""
    assert milvus_literal('a\\"b\n\r\t\0') == '"a\\\\\\"b\\n\\r\\t\0"'
    assert milvus_list(["a", 'b"']) == '["a", "b\\""]'


def _random_filter(rng, depth: int) -> tuple[str, str | None]:
    """A random filter text with as few parentheses as the precedence (not > and > or) allows, plus
    some redundant ones; returns the text and its top operator ("and", "or", or None)."""
    if depth == 0 or rng.random() < 0.3:
        field = rng.choice(["category", "color", "kids"])
        values = {"category": ["dress", "pants"], "color": ["red", "black", ""], "kids": ["true", "false"]}[field]
        quote = '"%s"' if rng.random() < 0.5 else "'%s'"
        literal = (lambda v: v) if field == "kids" else (lambda v: quote % v)
        op = rng.choice(["==", "!=", "in", "not in"])
        if op in ("==", "!="):
            return f"{field} {op} {literal(rng.choice(values))}", None
        chosen = rng.sample(values, rng.randint(1, len(values)))
        return f"{field} {op} [{', '.join(literal(v) for v in chosen)}]", None
    if rng.random() < 0.2:
        text, inner = _random_filter(rng, depth - 1)
        return f"not ({text})" if inner or rng.random() < 0.2 else f"not {text}", None
    op = rng.choice(["and", "or"])
    parts = []
    for _ in range(rng.randint(2, 3)):
        text, inner = _random_filter(rng, depth - 1)
        needed = op == "and" and inner == "or"
        parts.append(f"({text})" if needed or rng.random() < 0.1 else text)
    return f" {op} ".join(parts), op


def test_random_filters_follow_the_precedence_of_not_and_or():
    """Issue 24 item 1: ``a and b or c`` is ``(a and b) or c``. The filter text and its Milvus
    translation are evaluated by Python's own ``not``/``and``/``or`` (same precedence as the grammar)
    on records of text fields, and compared with :meth:`Filter.matches` and :meth:`Filter.mask`."""
    import random

    rng = random.Random(24)
    records = [
        {
            f: rng.choice(vs)
            for f, vs in (
                ("category", ["dress", "pants", "hat"]),
                ("color", ["red", "black", "blue", None]),
                ("kids", [True, False]),
            )
            if rng.random() < 0.9
        }
        for _ in range(40)
    ]
    columns = {
        f: np.array([field_text(r.get(f)) for r in records], dtype=object) for f in ("category", "color", "kids")
    }
    texts = [
        'category == "dress" and color == "red" or kids == true',  # the hand-made cases first
        'kids == true or category == "dress" and color == "red"',
    ]
    texts += [_random_filter(rng, 3)[0] for _ in range(300)]
    for text in texts:
        parsed = parse_filter(text)
        milvus = parsed.to_milvus()
        for number, record in enumerate(records):
            names = {"true": "true", "false": "false", **{f: columns[f][number] for f in columns}}
            expected = eval(text, {"__builtins__": {}}, names)  # our own generated text, as Python
            assert parsed.matches(record) == expected, (text, record)
            assert eval(milvus, {"__builtins__": {}}, names) == expected, (text, milvus, record)
        expected_rows = [n for n in range(len(records)) if parsed.matches(records[n])]
        assert np.flatnonzero(parsed.mask(columns, len(records))).tolist() == expected_rows, text
    hand = parse_filter(texts[0])
    assert [
        hand.matches(r)
        for r in (
            {"category": "hat", "kids": True},
            {"category": "dress", "color": "red"},
            {"category": "dress", "color": "blue", "kids": False},
        )
    ] == [True, True, False]


@pytest.mark.parametrize(
    "text, message",
    [
        ("color", "unexpected end, expected '==', '!=', 'in' or 'not in'"),
        ("color ==", "unexpected end, expected a value"),
        ("color not", "unexpected end, expected 'in'"),
        ("color in", "unexpected end, expected '['"),
        ('color in ["red"', "unexpected end, expected ']'"),
        ("", "it is empty"),
        ('(color == "red"]', "unexpected token ']', expected ')' at position 16"),
        ('color in ("red")', "unexpected token '(', expected '[' at position 10"),
        ('color [ "red"', "unexpected token '[', expected '==', '!=', 'in' or 'not in' at position 7"),
        ('color or ["red"]', "unexpected token 'or', expected '==', '!=', 'in' or 'not in' at position 7"),
        ('color not == "red"', "unexpected token '==', expected '==', '!=', 'in' or 'not in' at position 11"),
        ("color == not", "unexpected token 'not', expected a quoted text, a number, true or false at position 10"),
        ("color == and", "unexpected token 'and', expected a quoted text, a number, true or false at position 10"),
        ("color in [red]", "unexpected token 'red', expected a quoted text, a number, true or false at position 11"),
    ],
)
def test_errors_in_full(text, message):
    """The whole one-line message: the filter as written, the reason, the 1-based position."""
    with pytest.raises(FilterError) as error:
        parse_filter(text)
    assert str(error.value) == f"bad filter {text!r}: {message}"


def test_long_filters_are_shown_cut_to_100_characters():
    exactly = 'color == "' + "x" * 86 + '" or'  # 100 characters
    with pytest.raises(FilterError) as error:
        parse_filter(exactly)
    assert str(error.value) == f"bad filter {exactly!r}: unexpected end, expected a field name"
    longer = exactly + " "
    assert len(exactly) == 100
    with pytest.raises(FilterError) as error:
        parse_filter(longer)
    assert str(error.value) == f"bad filter {longer[:97] + '...'!r}: unexpected end, expected a field name"
    deep = "(" * 60 + 'color == "red"' + ")" * 60
    with pytest.raises(FilterError) as error:
        parse_filter(deep)
    assert str(error.value) == (
        f"bad filter {deep[:97] + '...'!r}: nested more than 32 levels deep (parentheses and 'not') at position 33"
    )
    controlled = exactly[:-2] + "\x01r "
    with pytest.raises(FilterError) as error:
        parse_filter(controlled)
    assert str(error.value) == (
        f"bad filter {longer[:97] + '...'!r}: control character U+0001 at position 99; a filter is plain text"
    )


def test_parsed_filter_keeps_its_text_and_fields():
    text = 'not colour == "red" and (size == 1 or not kids in [true]) '  # trailing spaces are fine
    parsed = parse_filter(text)
    assert parsed.text == text and parsed.fields == {"colour", "size", "kids"}
    with pytest.raises(FilterError) as error:
        parse_filter(text, ["size", "kids"])
    assert str(error.value) == f"bad filter {text!r}: unknown field 'colour' (filterable fields: kids, size)"
    with pytest.raises(FilterError) as error:
        parse_filter("not (size == 1 or kids == true)", [])
    assert str(error.value).endswith("unknown field 'kids' (filterable fields: none)")
    assert parse_filter("not (size == 1 or kids == true)", ["kids", "size"]).fields == {"kids", "size"}


def test_field_text_of_nested_values_is_sorted_unescaped_json():
    assert field_text({"b": [1, 2], "a": "é"}) == '{"a": "é", "b": [1, 2]}'
    assert field_text(["ü", None, True]) == '["ü", null, true]'
    # values JSON has no type for (a date) compare as their text, also inside lists and objects
    assert field_text(datetime.date(2024, 5, 1)) == "2024-05-01"
    assert field_text({"made": datetime.date(2024, 5, 1), "sizes": ["s"]}) == '{"made": "2024-05-01", "sizes": ["s"]}'
    assert parse_filter("tags == '[\"ü\", null, true]'").matches({"tags": ["ü", None, True]})


def test_a_field_no_record_has_reads_as_empty_text_on_columns():
    for text, expected in (
        ('season == ""', [0, 1, 2]),
        ('season != ""', []),
        ('season in ["", "x"] and color == "red"', [0]),
        ('not season == "winter"', [0, 1, 2]),
        ('color == "blue" or season == "winter"', [1]),
    ):
        parsed = parse_filter(text)
        columns = {"color": np.array(["red", "blue", ""], dtype=object)}
        assert np.flatnonzero(parsed.mask(columns, 3)).tolist() == expected, text
        records = [{"color": "red"}, {"color": "blue"}, {}]
        assert [n for n, r in enumerate(records) if parsed.matches(r)] == expected, text
