"""One small filter grammar over catalog metadata, parsed once and run by every vector store.

    expr       := term ("or" term)*
    term       := factor ("and" factor)*
    factor     := "not" factor | "(" expr ")" | comparison
    comparison := FIELD ("==" | "!=") VALUE | FIELD ["not"] "in" "[" VALUE ("," VALUE)* "]"
    VALUE      := "text" | 'text' | NUMBER | true | false
    NUMBER     := ["-"] ("0" | [1-9][0-9]*) ["." [0-9]+]

Nesting (parentheses and ``not``) is limited to :data:`MAX_DEPTH` levels and control characters
(other than tab and line breaks) are refused, so a filter never reaches a store it could crash.
Values are compared as text (:func:`field_text`): ``kids == false`` matches a JSON ``false``, and a
missing or null field reads as ``""`` (so ``color != "black"`` keeps items without a colour).
A :class:`Filter` evaluates on one record (:meth:`Filter.matches`), on metadata columns at once
(:meth:`Filter.mask`, FAISS pre-filtering) and translates to a Milvus boolean expression
(:meth:`Filter.to_milvus`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from ..errors import DataError

FIELD_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKEN = re.compile(
    r"""\s*(?:(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<number>-?\d+(?:\.\d+)?)|"""
    r"""(?P<op>==|!=|\(|\)|\[|\]|,)|(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<bad>\S))"""
)
NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?\Z")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
KEYWORDS = {"and", "or", "not", "in", "true", "false"}
MAX_FILTER_CHARS = 2000
MAX_DEPTH = 32  # levels of parentheses and ``not``
SHOWN_CHARS = 100  # of the filter text, in error messages
_MILVUS_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


class FilterError(DataError):
    """A filter that does not parse, or names a field the catalog cannot filter on."""


def field_text(value: Any) -> str:
    """The text a metadata value is compared as: strings as they are, ``true``/``false``, numbers
    in JSON form, ``""`` for missing/null, JSON for lists and objects, and any other value (a date)
    as its text, which is what the stores save of it."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return str(value)


@dataclass(frozen=True)
class Compare:
    field: str
    negate: bool  # != / not in
    values: tuple[str, ...]


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    item: Node


Node = Compare | BoolOp | Not


@dataclass(frozen=True)
class Filter:
    """A parsed filter; ``text`` is what the user wrote."""

    text: str
    root: Node

    @property
    def fields(self) -> set[str]:
        return _fields(self.root)

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        return _match(self.root, metadata)

    def mask(self, columns: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        """Boolean mask over ``size`` rows from text columns (``field -> object array``)."""
        return _mask(self.root, columns, size)

    def to_milvus(self, prefix: str = "") -> str:
        """The Milvus boolean expression (scalar fields named ``prefix + field``)."""
        return _milvus(self.root, prefix)


def _fields(node: Node) -> set[str]:
    if isinstance(node, Compare):
        return {node.field}
    if isinstance(node, Not):
        return _fields(node.item)
    return set().union(*(_fields(item) for item in node.items))


def _match(node: Node, metadata: Mapping[str, Any]) -> bool:
    if isinstance(node, Compare):
        return (field_text(metadata.get(node.field)) in node.values) != node.negate
    if isinstance(node, Not):
        return not _match(node.item, metadata)
    results = (_match(item, metadata) for item in node.items)
    return all(results) if node.op == "and" else any(results)


def _mask(node: Node, columns: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    if isinstance(node, Compare):
        column = columns.get(node.field)
        if column is None:
            column = np.full(size, "", dtype=object)
        hit = np.isin(column, np.array(node.values, dtype=object))
        return ~hit if node.negate else hit
    if isinstance(node, Not):
        return ~_mask(node.item, columns, size)
    masks = [_mask(item, columns, size) for item in node.items]
    return np.logical_and.reduce(masks) if node.op == "and" else np.logical_or.reduce(masks)


def milvus_literal(value: str) -> str:
    """``value`` as a double-quoted Milvus string literal. Only the escapes that both milvus-lite
    and the Milvus server read are used (backslash, quote, newline, carriage return, tab); every
    other character stands as it is, so any string is quoted safely."""
    return '"' + value.translate(_MILVUS_ESCAPES) + '"'


def milvus_list(values: Iterable[str]) -> str:
    """A Milvus list literal of strings (``["a", "b"]``)."""
    return "[" + ", ".join(milvus_literal(v) for v in values) + "]"


def _milvus(node: Node, prefix: str) -> str:
    if isinstance(node, Compare):
        name = prefix + node.field
        if len(node.values) == 1:
            return f"({name} {'!=' if node.negate else '=='} {milvus_literal(node.values[0])})"
        return f"({name} {'not in' if node.negate else 'in'} {milvus_list(node.values)})"
    if isinstance(node, Not):
        return f"(not {_milvus(node.item, prefix)})"
    return "(" + f" {node.op} ".join(_milvus(item, prefix) for item in node.items) + ")"


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        position = 0
        while position < len(text):
            match = _TOKEN.match(text, position)
            if match is None:  # only trailing whitespace is left
                break
            kind = match.lastgroup
            assert kind is not None  # every alternative of _TOKEN is a named group
            value = match.group(kind)
            start = match.start(kind)
            if kind == "bad":
                self.fail(f"unexpected character {value!r}", start)
            if kind == "word" and value.lower() in KEYWORDS:
                kind, value = "keyword", value.lower()
            self.tokens.append((kind, value, start))
            position = match.end()
        self.position = 0

    def fail(self, message: str, at: int | None = None) -> NoReturn:
        where = f" at position {at + 1}" if at is not None else ""
        raise FilterError(f"bad filter {_shown(self.text)!r}: {message}{where}")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, expected: str) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            self.fail(f"unexpected end, expected {expected}")
        self.position += 1
        return token

    def accept(self, kind: str, value: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == kind and token[1] == value:
            self.position += 1
            return True
        return False

    def expect(self, kind: str, value: str) -> None:
        token = self.take(repr(value))
        if token[0] != kind or token[1] != value:
            self.fail(f"unexpected token {token[1]!r}, expected {value!r}", token[2])

    def parse(self) -> Node:
        if not self.tokens:
            self.fail("it is empty")
        node = self.expr(0)
        token = self.peek()
        if token is not None:
            self.fail(f"unexpected token {token[1]!r}, expected 'and', 'or' or the end", token[2])
        return node

    def expr(self, depth: int) -> Node:
        items = [self.term(depth)]
        while self.accept("keyword", "or"):
            items.append(self.term(depth))
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    def term(self, depth: int) -> Node:
        items = [self.factor(depth)]
        while self.accept("keyword", "and"):
            items.append(self.factor(depth))
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def factor(self, depth: int) -> Node:
        token = self.peek()
        if token is not None and token[:2] in (("keyword", "not"), ("op", "(")) and depth == MAX_DEPTH:
            self.fail(f"nested more than {MAX_DEPTH} levels deep (parentheses and 'not')", token[2])
        if self.accept("keyword", "not"):
            return Not(self.factor(depth + 1))
        if self.accept("op", "("):
            node = self.expr(depth + 1)
            self.expect("op", ")")
            return node
        return self.comparison()

    def comparison(self) -> Node:
        kind, field, at = self.take("a field name")
        if kind != "word":
            self.fail(f"unexpected token {field!r}, expected a field name", at)
        kind, op, at = self.take("'==', '!=', 'in' or 'not in'")
        if kind == "op" and op in ("==", "!="):
            return Compare(field, op == "!=", (self.value(),))
        negate = kind == "keyword" and op == "not"
        if negate:
            kind, op, at = self.take("'in'")
        if kind != "keyword" or op != "in":
            self.fail(f"unexpected token {op!r}, expected '==', '!=', 'in' or 'not in'", at)
        self.expect("op", "[")
        values = [self.value()]
        while self.accept("op", ","):
            values.append(self.value())
        self.expect("op", "]")
        return Compare(field, negate, tuple(dict.fromkeys(values)))

    def value(self) -> str:
        kind, value, at = self.take("a value")
        if kind == "string":
            return re.sub(r"\\(.)", r"\1", value[1:-1])  # \" \' \\ escapes
        if kind == "number":
            if not NUMBER.match(value):
                self.fail(f"bad number {value!r} (write 42, -7 or 0.5: no leading zeros)", at)
            return field_text(float(value) if "." in value else int(value))
        if kind == "keyword" and value in ("true", "false"):
            return value
        self.fail(f"unexpected token {value!r}, expected a quoted text, a number, true or false", at)


def parse_filter(text: str, fields: Iterable[str] | None = None) -> Filter:
    """Parse ``text``; with ``fields``, refuse a field that is not one of them (naming it)."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter is too long ({len(text)} characters; at most {MAX_FILTER_CHARS})")
    control = CONTROL.search(text)
    if control:
        raise FilterError(
            f"bad filter {_shown(text)!r}: control character U+{ord(control.group()):04X} at position "
            f"{control.start() + 1}; a filter is plain text"
        )
    parsed = Filter(text, _Parser(text).parse())
    if fields is not None:
        known = set(fields)
        unknown = sorted(parsed.fields - known)
        if unknown:
            raise FilterError(
                f"bad filter {_shown(text)!r}: unknown field {unknown[0]!r} (filterable fields: "
                f"{', '.join(sorted(known)) or 'none'})"
            )
    return parsed


def _shown(text: str) -> str:
    """The filter as error messages quote it: its first :data:`SHOWN_CHARS` characters."""
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def filterable_fields(metadata: Iterable[Mapping[str, Any]]) -> list[str]:
    """The metadata keys a filter may name: those that are identifiers (sorted)."""
    keys: set[str] = set()
    for record in metadata:
        keys.update(k for k in record if FIELD_PATTERN.match(k))
    return sorted(keys)
