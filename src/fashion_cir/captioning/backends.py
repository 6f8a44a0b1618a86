"""Building a captioner from a backend name: ``llava-hf``, ``openai`` or ``precomputed``."""

from __future__ import annotations

from typing import Any

from ..errors import ModelError
from .base import Captioner
from .vocab import DEFAULT_VOCABULARY, Vocabulary

BACKENDS = ("llava-hf", "openai", "precomputed")


def build_captioner(
    backend: str, model: str | None = None, vocab: Vocabulary = DEFAULT_VOCABULARY, **options: Any
) -> Captioner:
    """``model``: HF model id or folder (llava-hf), served model name (openai), attributes JSONL path
    (precomputed). ``options`` go to the backend's constructor (e.g. base_url, concurrency, batch_size)."""
    if backend == "llava-hf":
        from .llava_hf import DEFAULT_MODEL, LlavaHFCaptioner

        return LlavaHFCaptioner(model or DEFAULT_MODEL, vocab=vocab, **options)
    if backend == "openai":
        from .openai_compat import OpenAICaptioner

        if not model:
            raise ModelError("the openai backend needs a model name (the name the server serves)")
        return OpenAICaptioner(model, vocab=vocab, **options)
    if backend == "precomputed":
        from .precomputed import PrecomputedCaptioner

        if not model:
            raise ModelError("the precomputed backend needs the path of an attributes JSONL file")
        return PrecomputedCaptioner(model, vocab=vocab, **options)
    raise ModelError(f"unknown captioning backend {backend!r}; expected one of {', '.join(BACKENDS)}")
