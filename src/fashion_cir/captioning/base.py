"""The captioner interface: a batch of images in, one raw text answer (or a request failure) out.
Parsing, validation, retries with feedback and caching are the runner's job, the same for all backends."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from .prompt import build_prompt, prompt_version
from .vocab import DEFAULT_VOCABULARY, Vocabulary


@dataclass(frozen=True)
class CaptionRequest:
    """One image to describe; ``feedback`` says why the previous answer was rejected (retries)."""

    image_id: str
    path: Path
    feedback: str | None = None


class RequestFailed(Exception):
    """The backend could not produce an answer (unreadable image, HTTP error after retries, ...)."""


class Captioner(ABC):
    """A backend that answers the attribute prompt for images. ``model_id`` and ``prompt_version``
    key the cache; ``batch_size`` is how many requests the runner hands over at once;
    ``thread_safe``: threads may call :meth:`answer` at once (a server's uploads)."""

    model_id: str
    batch_size: int = 8
    thread_safe: bool = False

    def __init__(self, vocab: Vocabulary = DEFAULT_VOCABULARY):
        self.vocab = vocab

    @property
    def prompt_version(self) -> str:
        return prompt_version(self.vocab)

    def prompt(self, request: CaptionRequest) -> str:
        return build_prompt(self.vocab, request.feedback)

    @abstractmethod
    def answer(self, requests: list[CaptionRequest]) -> list[str | RequestFailed]:
        """One raw answer (or a ``RequestFailed``) per request, in order; never raises for one image."""
