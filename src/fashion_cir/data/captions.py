"""Joining FashionIQ's two relative captions and building sentence-level query text."""

from __future__ import annotations

import random


def clean_caption(caption: str) -> str:
    return caption.strip(".?, ")


def join_captions_val(captions: list[str]) -> str:
    """CLIP4Cir's validation joining: "C1 and c2"."""
    cleaned = [clean_caption(c) for c in captions if clean_caption(c)]
    if not cleaned:
        return ""
    if len(cleaned) == 1:
        return cleaned[0][:1].upper() + cleaned[0][1:]
    first, second = cleaned[0], cleaned[1]
    return f"{first[:1].upper()}{first[1:]} and {second}"


def join_captions_train(captions: list[str], rng: random.Random) -> str:
    """CLIP4Cir's training joining: one of "c1 and c2", "c2 and c1", "c1", "c2" (p=0.25 each)."""
    cleaned = [clean_caption(c) for c in captions if clean_caption(c)]
    if len(cleaned) < 2:
        return join_captions_val(cleaned)
    first, second = cleaned[0], cleaned[1]
    choice = rng.random()
    if choice < 0.25:
        text = f"{first} and {second}"
    elif choice < 0.5:
        text = f"{second} and {first}"
    elif choice < 0.75:
        text = first
    else:
        text = second
    return text[:1].upper() + text[1:]


def sentence_query(reference_prompt: str | None, caption: str) -> str:
    """Sentence-level prompt: the reference description joined with the relative caption,
    e.g. "a white short-sleeve t-shirt, but is red with long sleeves"."""
    caption = caption.strip()
    if not reference_prompt:
        return caption
    caption = caption[:1].lower() + caption[1:]
    return f"{reference_prompt.strip().rstrip('.')}, but {caption}"
