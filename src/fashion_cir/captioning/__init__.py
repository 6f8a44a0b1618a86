"""Image -> structured attributes + short description with a multimodal LLM (or stored answers)."""

from .backends import BACKENDS, build_captioner
from .base import Captioner, CaptionRequest, RequestFailed
from .precomputed import load_precomputed, write_attributes
from .runner import run_captioning
from .schema import Attributes, InvalidAnswer
from .vocab import DEFAULT_VOCABULARY, AttributeVocab, Vocabulary, load_vocabulary

__all__ = [
    "BACKENDS",
    "Attributes",
    "AttributeVocab",
    "CaptionRequest",
    "Captioner",
    "DEFAULT_VOCABULARY",
    "InvalidAnswer",
    "RequestFailed",
    "Vocabulary",
    "build_captioner",
    "load_precomputed",
    "load_vocabulary",
    "run_captioning",
    "write_attributes",
]
