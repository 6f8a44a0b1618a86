"""Joining FashionIQ's two relative captions and building sentence-level query text."""

from __future__ import annotations

import random


def clean_caption(caption: str) -> str:
    return caption.strip(".?, ")


def join_captions_val(captions: list[str]) -> str:
    """CLIP4Cir's validation joining, character for character (the published FashionIQ protocol):
    ``c1.strip('.?, ').capitalize() + " and " + c2.strip('.?, ')``, an empty first caption
    included; a single caption is just cleaned and capitalised."""
    if len(captions) < 2:
        return clean_caption(captions[0]).capitalize() if captions else ""
    return f"{clean_caption(captions[0]).capitalize()} and {clean_caption(captions[1])}"


def join_captions_train(captions: list[str], rng: random.Random) -> str:
    """CLIP4Cir's training joining: one of "c1 and c2", "c2 and c1", "c1", "c2" (p=0.25 each);
    empty captions are left out."""
    cleaned = [clean_caption(c) for c in captions if clean_caption(c)]
    if len(cleaned) < 2:
        return cleaned[0][:1].upper() + cleaned[0][1:] if cleaned else ""
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
