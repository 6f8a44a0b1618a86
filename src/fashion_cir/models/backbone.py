"""The one interface every dual encoder implements, so that caching, training, evaluation and
serving work the same for open_clip CLIP and the offline demo backbone."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from PIL import Image
from torch import nn

from .preprocess import build_transform, describe_transform

ENCODERS = ("image", "text")


def blocks_option(option: str) -> int | None:
    """N from a spec option ``blocksN`` (N >= 1: the trunk cache stops before the last N blocks), else None."""
    match = re.fullmatch(r"blocks(\d+)", option)
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


class Backbone(nn.Module, ABC):
    """A dual encoder. Subclasses set ``spec`` (the factory string that rebuilds it),
    ``feature_dim``, ``context_length`` and the preprocessing, and implement the abstract methods."""

    spec: str
    feature_dim: int
    context_length: int
    trunk_variant: str = ""  # what else shapes the trunk's output (hashed into the cache key when set)

    def __init__(self, image_size: int, preprocess_mode: str, mean, std):
        super().__init__()
        self.image_size = image_size
        self.preprocess_mode = preprocess_mode
        self._mean, self._std = tuple(mean), tuple(std)
        self._transform = build_transform(preprocess_mode, image_size, self._mean, self._std)

    # -- preprocessing and tokenisation -------------------------------------------------------
    def set_preprocess(self, mode: str) -> None:
        self.preprocess_mode = mode
        self._transform = build_transform(mode, self.image_size, self._mean, self._std)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    @property
    def preprocess_description(self) -> str:
        return describe_transform(self.preprocess_mode, self.image_size)

    @abstractmethod
    def tokenize(self, texts: list[str]) -> Any:
        """Texts to whatever ``encode_texts`` takes (a tensor or a dict of tensors)."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes, special tokens included."""

    # -- encoders ------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features [N, feature_dim]."""
        return self.image_head(self.encode_image_trunk(pixels))

    @abstractmethod
    def encode_image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """The expensive part of image encoding, whose output the feature cache stores."""

    def trunk_engine(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What the feature cache runs on pixels: ``encode_image_trunk``, or a faster engine giving
        the same features."""
        return self.encode_image_trunk

    def image_head(self, trunk_features: torch.Tensor) -> torch.Tensor:
        """The cheap part applied after the cache (a projection); identity by default."""
        return trunk_features

    def trunk_prefixes(self) -> list[str]:
        """State-dict prefixes that determine ``encode_image_trunk``."""
        return self.encoder_prefixes("image")

    def head_prefixes(self) -> list[str]:
        """State-dict prefixes ``image_head`` uses: trainable from cached trunk features."""
        return []

    def trains_from_cache(self, last_n_blocks: int | None) -> bool:
        """Whether training the image side (its last N blocks) only touches the head, so the
        trunk's cached features can stand in for pixels."""
        head = tuple(self.head_prefixes())
        trainable = self.trainable_prefixes("image", last_n_blocks)
        return bool(head) and all(p.startswith(head) for p in trainable)

    @abstractmethod
    def encode_texts(self, tokens: Any) -> torch.Tensor:
        """Unnormalised text features [N, feature_dim]."""

    @abstractmethod
    def encoder_prefixes(self, encoder: str) -> list[str]:
        """State-dict name prefixes of ``encoder`` ('image' or 'text'), projections included."""

    def trainable_prefixes(self, encoder: str, last_n_blocks: int | None) -> list[str]:
        """Prefixes unfrozen for ``encoder``; backbones with blocks override to honour ``last_n_blocks``."""
        return self.encoder_prefixes(encoder)

    def set_trainable(self, encoders: Iterable[str], last_n_blocks: int | None = None) -> None:
        """Freeze everything, then unfreeze ``encoders`` (optionally only their last N blocks)."""
        prefixes: list[str] = []
        for encoder in encoders:
            if encoder not in ENCODERS:
                raise ValueError(f"unknown encoder {encoder!r}; expected one of {ENCODERS}")
            prefixes += self.trainable_prefixes(encoder, last_n_blocks)
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(tuple(prefixes)) if prefixes else False)

    def portable_spec(self) -> tuple[str, list[str]]:
        """The spec a saved model folder records, and the state-dict prefixes it must then store
        so that the folder alone rebuilds this backbone."""
        return self.spec, []

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Text features from the pooled output of a text tower a description matcher shares;
        backbones with such a tower (the offline one) implement it."""
        raise NotImplementedError(f"{self.spec}: no text tower a description matcher can share")

    def tokens_to(self, tokens: Any, device: torch.device | str) -> Any:
        if isinstance(tokens, torch.Tensor):
            return tokens.to(device)
        return {k: v.to(device) for k, v in tokens.items()}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- convenience -----------------------------------------------------------------------------
    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Encode many texts without gradients, batched; returns unnormalised features on CPU
        (call ``eval()`` first for deterministic features)."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokens_to(self.tokenize(texts[start : start + batch_size]), self.device)
            out.append(self.encode_texts(tokens).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.feature_dim)

    def fit_query_text(self, prompt: str | None, caption: str, join: Callable[[str | None, str], str]) -> str:
        """Join prompt and caption; when too long for the context, shorten the prompt word by word,
        never the caption."""
        text = join(prompt, caption)
        if not prompt or self.count_tokens(text) <= self.context_length:
            return text
        words = prompt.split()
        while words:
            words.pop()
            text = join(" ".join(words), caption) if words else caption
            if self.count_tokens(text) <= self.context_length:
                return text
        return caption

    def image_fingerprint(self) -> str:
        """Hash of everything that determines image features: the image encoder's weights and the
        preprocessing. Recorded with models and indexes."""
        return self._fingerprint(self.encoder_prefixes("image"))

    def trunk_fingerprint(self) -> str:
        """Hash of what determines the trunk features: the feature-cache key."""
        return self._fingerprint(self.trunk_prefixes())

    def _fingerprint(self, prefix_list: list[str]) -> str:
        prefixes = tuple(prefix_list)
        tensors = sorted((n, t) for n, t in self.state_dict().items() if n.startswith(prefixes))
        # tensors' version counters change on every in-place update (optimizer steps, load_state_dict),
        # so an unchanged model is hashed once, not on every cache lookup
        key = (
            self.preprocess_description,
            self.trunk_variant,
            tuple((n, t.data_ptr(), t._version) for n, t in tensors),
        )
        memo = self.__dict__.setdefault("_fingerprint_memo", {})
        if memo.get(prefixes, (None,))[0] != key:
            digest = hashlib.sha1(self.preprocess_description.encode())
            if self.trunk_variant:
                digest.update(self.trunk_variant.encode())
            for name, tensor in tensors:
                digest.update(name.encode())
                digest.update(memoryview(tensor.detach().cpu().float().contiguous().numpy()).cast("B"))
            memo[prefixes] = (key, digest.hexdigest()[:16])
        return memo[prefixes][1]
