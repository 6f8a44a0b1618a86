"""Pulling the JSON object out of a model's free-text answer (fenced blocks, prose around it,
single quotes, trailing commas) and validating it into ``Attributes``."""

from __future__ import annotations

import json
import re

from .schema import Attributes, InvalidAnswer, validate_attributes
from .vocab import Vocabulary

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _balanced_objects(text: str):
    """Yield every top-level ``{...}`` substring, respecting strings and nesting."""
    depth, start, in_string, escape, quote = 0, -1, False, False, ""
    for index, char in enumerate(text):
        if in_string:
            if escape:
                escape = False
            elif char == "\\":
                escape = True
            elif char == quote:
                in_string = False
        elif char in "\"'" and depth > 0:
            in_string, quote = True, char
        elif char == "{":
            if depth == 0:
                start = index
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                yield text[start : index + 1]


def loads_lenient(candidate: str) -> object:
    """json.loads, then again after fixing trailing commas, single quotes and Python literals."""
    try:
        return json.loads(candidate)
    except json.JSONDecodeError:
        pass
    repaired = _TRAILING_COMMA.sub(r"\1", candidate)
    if "'" in repaired and '"' not in repaired:
        repaired = repaired.replace("'", '"')
    repaired = re.sub(r"\bNone\b", "null", re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", repaired)))
    return json.loads(repaired)


def extract_json_object(answer: str) -> dict:
    """The first JSON object in ``answer``; ``InvalidAnswer`` if there is none."""
    blocks = [m.group(1) for m in _FENCE.finditer(answer)] + [answer]
    for block in blocks:
        for candidate in _balanced_objects(block):
            try:
                obj = loads_lenient(candidate)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    raise InvalidAnswer("the answer contains no JSON object")


def parse_answer(answer: str, vocab: Vocabulary) -> Attributes:
    """Raw model answer -> validated ``Attributes`` (repairing what is unambiguous)."""
    return validate_attributes(extract_json_object(answer), vocab)
