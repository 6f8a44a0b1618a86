"""open_clip backbones: any model name + pretrained tag, a local checkpoint, ``hf-hub:`` names, and
a tiny randomly initialised config for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError, one_line
from .backbone import Backbone
from .preprocess import CLIP_MEAN, CLIP_STD

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

WEIGHTS_HELP = (
    "This machine could not obtain the pretrained weights. Download the checkpoint where a model hub is "
    "reachable (for ViT-B-32 + openai: open_clip.create_model('ViT-B-32', pretrained='openai') and then "
    "torch.save(model.state_dict(), 'vit-b-32-openai.pt')), copy it here and pass "
    "--backbone openclip:ViT-B-32:/path/to/vit-b-32-openai.pt (or a local open_clip cache via "
    "HF_HUB_CACHE / HF_HOME)."
)


class OpenClipBackbone(Backbone):
    """Wraps an ``open_clip.CLIP`` model (visual tower, text transformer, projections). With
    ``head_blocks`` N (spec option ``+blocksN``, ViT towers) the feature cache stores the token
    sequence before the vision transformer's last N blocks, and :meth:`image_head` runs those blocks,
    the pooling and the projection: trainable from the cache, on CPU."""

    clip: Any  # an open_clip CLIP (untyped; its towers differ by architecture and are read by attribute)

    def __init__(self, model: Any, tokenizer, spec: str, preprocess_mode: str = "clip", head_blocks: int = 0):
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
        mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
        std = getattr(model.visual, "image_std", None) or CLIP_STD
        super().__init__(image_size, preprocess_mode, mean, std)
        self.clip = model
        self.clip.logit_scale.requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.context_length = int(getattr(model, "context_length", 77))
        self.feature_dim = int(
            model.text_projection.shape[1] if model.text_projection is not None else model.visual.output_dim
        )
        self.head_blocks = head_blocks
        if head_blocks:
            visual = model.visual
            if not hasattr(visual, "_embeds") or not hasattr(getattr(visual, "transformer", None), "resblocks"):
                raise ModelError(f"{spec}: +blocks{head_blocks} needs a ViT image tower")
            if head_blocks >= len(visual.transformer.resblocks):
                raise ModelError(
                    f"{spec}: +blocks{head_blocks}, but the image tower has {len(visual.transformer.resblocks)} blocks"
                )
            self.trunk_variant = f"blocks{head_blocks}"
            size = self.image_size
            with torch.no_grad():
                self.token_shape = tuple(visual.eval()._embeds(torch.zeros(1, 3, size, size)).shape[1:])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def count_tokens(self, text: str) -> int:
        encoder = getattr(self.tokenizer, "encode", None)
        if encoder is None:  # HF tokenizers wrapped by open_clip
            return int((self.tokenizer([text]) != 0).sum())
        return len(encoder(text)) + 2

    def encode_image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.head_blocks:
            return self.clip.encode_image(pixels)
        return self._blocks(self.clip.visual._embeds(pixels), 0, self._split).flatten(1)

    def image_head(self, trunk_features: torch.Tensor) -> torch.Tensor:
        if not self.head_blocks:
            return trunk_features
        visual = self.clip.visual
        tokens = self._blocks(trunk_features.reshape(-1, *self.token_shape), self._split, self._depth)
        pooled, _ = visual._pool(tokens)
        return pooled @ visual.proj if visual.proj is not None else pooled

    @property
    def _depth(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @property
    def _split(self) -> int:
        return self._depth - self.head_blocks

    def _blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Vision transformer blocks ``start..stop-1`` on batch-first tokens [N, L, D]."""
        transformer = self.clip.visual.transformer
        x = tokens if transformer.batch_first else tokens.transpose(0, 1)
        for block in transformer.resblocks[start:stop]:
            x = block(x)
        return x if transformer.batch_first else x.transpose(0, 1)

    def head_prefixes(self) -> list[str]:
        if not self.head_blocks:
            return []
        return [f"clip.visual.transformer.resblocks.{i}." for i in range(self._split, self._depth)] + [
            "clip.visual.ln_post.",
            "clip.visual.proj",
            "clip.visual.attn_pool.",
            "clip.visual.ln_pool.",
        ]

    def trunk_prefixes(self) -> list[str]:
        if not self.head_blocks:
            return self.encoder_prefixes("image")
        head = tuple(self.head_prefixes())
        return [name for name in self.state_dict() if name.startswith("clip.visual.") and not name.startswith(head)]

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)

    def encoder_prefixes(self, encoder: str) -> list[str]:
        if encoder == "image":
            return ["clip.visual."]
        return [
            "clip.transformer.",
            "clip.token_embedding.",
            "clip.ln_final.",
            "clip.text.",
            "clip.positional_embedding",
            "clip.text_projection",
        ]

    def trainable_prefixes(self, encoder: str, last_n_blocks: int | None) -> list[str]:
        """With ``+blocksN`` the image side trains what runs after the cache (its last N blocks)."""
        if encoder == "image" and self.head_blocks:
            if last_n_blocks is not None and last_n_blocks > self.head_blocks:
                raise ModelError(
                    f"cannot train the last {last_n_blocks} image blocks of {self.spec}: the feature "
                    f"cache holds the tokens before the last {self.head_blocks}; use +blocks{last_n_blocks}"
                )
            return self.head_prefixes()
        if last_n_blocks is None:
            return self.encoder_prefixes(encoder)
        tower = self.clip.visual.transformer if encoder == "image" else self.clip.transformer
        if not hasattr(tower, "resblocks"):
            raise ModelError(f"--last-n-blocks needs a ViT/transformer {encoder} tower; {self.spec} has none")
        depth = len(tower.resblocks)
        first = max(depth - last_n_blocks, 0)
        base = "clip.visual.transformer" if encoder == "image" else "clip.transformer"
        blocks = [f"{base}.resblocks.{i}." for i in range(first, depth)]
        tail = (
            ["clip.visual.ln_post.", "clip.visual.proj"]
            if encoder == "image"
            else ["clip.ln_final.", "clip.text_projection"]
        )
        return blocks + tail


def _import_open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ModelError("open_clip is not installed: pip install open-clip-torch") from exc
    return open_clip


def build_tiny(seed: int = 0, head_blocks: int = 0) -> OpenClipBackbone:
    """A tiny randomly initialised CLIP (open_clip architecture, real BPE tokenizer) for tests."""
    open_clip = _import_open_clip()
    from open_clip.model import CLIP

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIP(**TINY_CLIP_CONFIG)
    finally:
        torch.random.set_rng_state(generator_state)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    options = f"+blocks{head_blocks}" if head_blocks else ""
    return OpenClipBackbone(model.eval(), tokenizer, spec=f"tiny{options}:{seed}", head_blocks=head_blocks)


def build_openclip(model_name: str, pretrained: str | None, head_blocks: int = 0) -> OpenClipBackbone:
    """``model_name`` + pretrained tag or local file; ``hf-hub:org/repo`` model names pass through."""
    open_clip = _import_open_clip()
    kind = f"openclip+blocks{head_blocks}" if head_blocks else "openclip"
    is_hub = model_name.startswith("hf-hub:")
    if not is_hub and not pretrained:
        raise ModelError(
            f"openclip:{model_name} needs a pretrained tag or checkpoint file, e.g. openclip:{model_name}:openai "
            f"(or openclip:{model_name}:random for random weights, useful only for speed tests)"
        )
    if pretrained == "random":
        model = open_clip.create_model(model_name, pretrained=None)
        return OpenClipBackbone(
            model.eval(),
            open_clip.get_tokenizer(model_name),
            spec=f"{kind}:{model_name}:random",
            head_blocks=head_blocks,
        )
    if not is_hub and model_name not in open_clip.list_models():
        raise ModelError(
            f"unknown open_clip model {model_name!r}; see open_clip.list_models() (e.g. ViT-B-32, ViT-B-16, RN50x4)"
        )
    if pretrained and not is_hub and (Path(pretrained).suffix or "/" in pretrained) and not Path(pretrained).is_file():
        raise ModelError(f"checkpoint file not found: {pretrained}")
    if pretrained and not is_hub and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ModelError(f"unknown pretrained tag {pretrained!r} for {model_name}; known tags: {tags}")
    try:
        model = open_clip.create_model(
            model_name, pretrained=None if is_hub else pretrained, require_pretrained=bool(pretrained)
        )
    except ModelError:
        raise
    except Exception as exc:  # network, hub or file errors all mean: weights unavailable
        if pretrained and not is_hub and Path(pretrained).is_file():
            raise ModelError(f"cannot load checkpoint file {pretrained} into {model_name}: {one_line(exc)}") from exc
        raise ModelError(
            f"could not load weights for {model_name} ({pretrained or 'hf-hub'}): {one_line(exc)}. {WEIGHTS_HELP}"
        ) from exc
    tokenizer = open_clip.get_tokenizer(model_name)
    spec = f"{kind}:{model_name}" + (f":{pretrained}" if pretrained else "")
    return OpenClipBackbone(model.eval(), tokenizer, spec=spec, head_blocks=head_blocks)
