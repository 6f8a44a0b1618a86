"""The attribute prompt. Its version (template tag + hash of the text, which embeds the
vocabulary) is part of every cache key, so changing either re-captions instead of reusing."""

from __future__ import annotations

import json

from ..io import text_sha1
from .vocab import Vocabulary

TEMPLATE_TAG = "attributes-v1"


def build_prompt(vocab: Vocabulary, feedback: str | None = None) -> str:
    """Ask for one JSON object with every attribute from its vocabulary plus a short description.
    ``feedback`` (why a previous answer was rejected) is appended on retries."""
    fields = {}
    for name, spec in vocab.attributes.items():
        choices = " | ".join(json.dumps(v) for v in spec.values) + (" | null" if spec.nullable else "")
        fields[name] = choices
    lines = [f'  "{name}": {choices},' for name, choices in fields.items()]
    low, high = vocab.description_words
    text = (
        "Look at the clothing item in the photo and describe it. Answer with ONE JSON object and nothing "
        "else, using exactly these keys and one of the listed values for each:\n{\n"
        + "\n".join(lines)
        + '\n  "kids": true | false,\n'
        + f'  "description": a {low}-{high} word noun phrase, e.g. "a white short-sleeve cotton t-shirt with a globe print"\n}}'
    )
    if feedback:
        text += f"\nYour previous answer was rejected ({feedback}). Answer again with valid JSON only."
    return text


def prompt_version(vocab: Vocabulary) -> str:
    return f"{TEMPLATE_TAG}-{text_sha1(build_prompt(vocab))[:10]}"
