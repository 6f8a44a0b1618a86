"""Optional LLM rewrite of template captions into freer annotator language (text only). Any backend
with ``complete_texts(prompts) -> list[str | Exception]`` works (the openai backend has it); an
answer that is not two short captions keeps the template captions."""

from __future__ import annotations

from typing import Protocol

from ..captioning.parse import loads_lenient

PROMPT = (
    "You write relative captions for a fashion image retrieval dataset, like human annotators do: short "
    'phrases saying how the TARGET differs from the REFERENCE, e.g. "is grey with an all-over dark star print", '
    '"has short sleeves and a v neck instead of straps", "is solid black with no contrast collar".\n'
    "REFERENCE: {reference}\nTARGET: {target}\nDIFFERENCES: {differences}\n"
    "DRAFT CAPTIONS: {drafts}\n"
    "Rewrite the drafts into two different natural captions of 3 to 15 words, each starting with a verb such as "
    '"is", "has" or "are". Mention only the listed differences and facts about the TARGET. '
    "Answer with a JSON list of two strings and nothing else."
)


class TextGenerator(Protocol):
    model_id: str

    def complete_texts(self, prompts: list[str]) -> list[str | Exception]: ...


def rewrite_prompt(triplet: dict) -> str:
    differences = "; ".join(f"{name}: {old} -> {new}" for name, (old, new) in triplet["changes"].items())
    return PROMPT.format(
        reference=triplet["reference_prompt"],
        target=triplet["target_prompt"],
        differences=differences,
        drafts=" | ".join(triplet["captions"]),
    )


def parse_rewrite(answer: str) -> list[str] | None:
    """Two 3-15 word captions from the answer, or None."""
    start, end = answer.find("["), answer.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        captions = loads_lenient(answer[start : end + 1])
    except ValueError:
        return None
    if not isinstance(captions, list) or len(captions) != 2 or not all(isinstance(c, str) for c in captions):
        return None
    captions = [" ".join(c.split()).strip(" .") for c in captions]
    if not all(3 <= len(c.split()) <= 15 for c in captions):
        return None
    return captions


def rewrite_captions(triplets: list[dict], generator: TextGenerator) -> int:
    """Replace each triplet's captions by the LLM rewrite where it is valid (keeping the drafts under
    ``template_captions`` and marking ``source``); returns how many were rewritten."""
    answers = generator.complete_texts([rewrite_prompt(t) for t in triplets])
    rewritten = 0
    for triplet, answer in zip(triplets, answers, strict=True):
        captions = parse_rewrite(answer) if isinstance(answer, str) else None
        if captions:
            triplet["template_captions"] = triplet["captions"]
            triplet["captions"] = captions
            triplet["source"] = f"{triplet['source']}+rewrite:{generator.model_id}"
            rewritten += 1
    return rewritten
