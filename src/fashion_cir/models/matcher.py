"""The description matcher: the encoders that let a query read each catalog item's MLLM
description, not only its pixels.

The captioning step describes every catalog image anyway (it is what triplets are mined from), so
an item is its image features *and* its description. A sentence encoder embeds descriptions with
frozen weights (the item side: computed once per catalog, a static bank, :class:`DescriptionBank`),
and a trainable copy of the same encoder embeds the query's texts (the caption, the reference's
description joined with it). How those scores are weighed is the model's
:class:`~fashion_cir.models.fusion.Fusion`.

Encoders (``spec``, see :mod:`.sentence_encoder`): ``minilm`` (all-MiniLM-L6-v2, 384-d), ``mpnet[:DIR]``
(all-mpnet-base-v2, 768-d) or any local sentence-transformers/Hugging Face folder ``hf:DIR``."""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_write_bytes, text_sha1
from .batching import Coalescer
from .onnx_engine import export_graph, onnx_engine, onnxruntime_available
from .sentence_encoder import HFEncoder, load_encoder, mean_pool

log = logging.getLogger(__name__)


class DescriptionMatcher(nn.Module):
    """A frozen item encoder and a trainable query encoder: copies of one sentence encoder. With
    ``query_encoder`` the query side is that module, shared (the offline backbone's text tower,
    when it is the same sentence encoder: one encoder then reads a query's text for both sides)."""

    context_length = 128

    def __init__(self, spec: str = "minilm", query_encoder: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.shared = query_encoder is not None
        encoder, self.tokenizer = load_encoder(spec)
        self.query_encoder: HFEncoder = query_encoder if query_encoder is not None else encoder
        self.item_encoder: HFEncoder = (encoder if self.shared else copy.deepcopy(encoder)).requires_grad_(False).eval()
        self.dim = int(self.item_encoder.config.hidden_size)
        self._engines: dict[str, Coalescer] = {}  # side -> its ONNX Runtime engine, shared by threads

    def config(self) -> dict[str, Any]:
        return {"spec": self.spec, "shared": self.shared}

    def set_trainable(self, train: bool, last_n_blocks: int | None = None) -> None:
        """Freeze the item encoder and, unless ``train``, the query encoder; with ``last_n_blocks``
        only the query encoder's last N transformer layers train."""
        self.requires_grad_(False)
        if not train:
            return
        self._engines.clear()
        layers = self.query_encoder.encoder.layer
        first = 0 if last_n_blocks is None else max(len(layers) - last_n_blocks, 0)
        for layer in list(layers)[first:]:
            layer.requires_grad_(True)
        if last_n_blocks is None:
            self.query_encoder.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.item_encoder.eval()  # the item side is a static bank: never dropout
        if mode:
            self._engines.clear()  # weights may change: back to PyTorch
        return self

    def use_onnx(self, query_int8: bool = False) -> bool:
        """Encode texts through ONNX Runtime from now on (the same features within float rounding,
        faster for the few short texts of a search), until the matcher trains again; threads that
        encode at once share passes (:class:`~fashion_cir.models.batching.Coalescer`). ``query_int8``:
        the query side with int8 weights (faster; features close to the exact ones, lowest cosine
        0.92 on the demo's query texts; the item side, the stored bank's encoder, stays exact). False (and nothing changes) when onnxruntime is
        missing, switched off, the encoders are not on the CPU or the graph cannot be written (a
        warning says why)."""
        if next(self.parameters()).device.type != "cpu" or not onnxruntime_available():
            return False
        example = self.tokenize(["a red dress", "same but shorter and in navy"])
        varying = {"input_ids": [0, 1], "attention_mask": [0, 1]}
        built: dict[tuple[int, bool], Coalescer] = {}
        engines = {}
        for side, encoder in (("query", self.query_encoder), ("item", self.item_encoder)):
            key = (id(encoder), query_int8 and side == "query")
            if key not in built:
                name = f"text-{self.spec.split(':')[0]}-{state_sha1(encoder.state_dict())[:16]}"
                try:
                    graph = export_graph(PooledEncoder(encoder), name, example, varying)
                    run = onnx_engine(graph, spin=False, int8=key[1])
                except OSError as exc:  # no room or no right to write the graph: PyTorch still answers
                    log.warning("the description matcher stays on PyTorch: cannot export its ONNX graph (%s)", exc)
                    return False
                built[key] = Coalescer(self._tokenized(run))
            engines[side] = built[key]
        self._engines.update(engines)
        return True

    def _tokenized(self, run: Callable[..., torch.Tensor]) -> Callable[[list[str]], torch.Tensor]:
        return lambda texts: run(**self.tokenize(texts))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    @staticmethod
    def _pool(encoder: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(mean_pool(encoder, tokens), dim=-1)

    def pool(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """Unnormalised mean-pooled query-encoder features of many texts, no gradients, on the CPU."""
        return self.embed(texts, "query", batch_size, normalize=False)

    def encode_queries(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised query-side features (with gradients when training)."""
        return self._pool(self.query_encoder, tokens)

    @torch.no_grad()
    def embed(self, texts: list[str], side: str, batch_size: int = 128, normalize: bool = True) -> torch.Tensor:
        """Normalised features of many texts, no gradients, on the CPU; ``side`` is query or item."""
        encoder = self.query_encoder if side == "query" else self.item_encoder
        device = next(self.parameters()).device
        was_training = encoder.training
        if was_training:
            encoder.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            engine = self._engines.get(side)
            if engine is not None:
                pooled = engine(chunk)
            else:
                pooled = mean_pool(encoder, {k: v.to(device) for k, v in self.tokenize(chunk).items()})
            out.append((F.normalize(pooled, dim=-1) if normalize else pooled).float().cpu())
        if was_training:
            encoder.train()
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def embed_optional(self, texts: list[str | None], side: str) -> torch.Tensor:
        """:meth:`embed` of the texts that are given; rows of missing ones are zero."""
        out = torch.zeros(len(texts), self.dim)
        given = [(i, t) for i, t in enumerate(texts) if t]
        if given:
            out[[i for i, _ in given]] = self.embed([t for _, t in given], side)
        return out

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.query_encoder.state_dict().items()}


class PooledEncoder(nn.Module):
    """A sentence encoder's mean-pooled features as a module of its own (what ONNX exports)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(self.encoder, {"input_ids": input_ids, "attention_mask": attention_mask})


def hash_state(digest: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Feed a state dict to a hashlib ``digest``: each tensor's name and bytes, in name order."""
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def state_sha1(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha1()
    hash_state(digest, state)
    return digest.hexdigest()


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
        missing = sorted({k: d for k, d in zip(keys, descriptions) if k and d and k not in stored}.items())
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
