"""One factory for every backbone, addressed by a spec string:

- ``openclip:MODEL:TAG`` — open_clip model + pretrained tag (``openclip:ViT-B-32:openai``, the default)
- ``openclip:MODEL:/path/ckpt.pt`` — open_clip model + local checkpoint file
- ``openclip:MODEL:random`` — random weights (speed tests only)
- ``openclip:hf-hub:ORG/REPO`` — an open_clip model on the Hugging Face hub
- ``tiny[:SEED]`` — a tiny random open_clip config, for tests
- ``openclip+blocksN:...``, ``tiny+blocksN[:SEED]`` — the feature cache stops before the vision
  transformer's last N blocks, which then train on CPU from cached tokens
- ``offline[+OPTION...][:DIR]`` — the offline dual encoder (EfficientNet-Lite + MiniLM/mpnet;
  options ``lite1``, ``lite2``, ``mpnet``, ``hsv``, ``blocksN``, see
  :mod:`fashion_cir.models.offline_backbone`), aligned projections loaded from DIR when given
"""

from __future__ import annotations

from ..errors import ModelError
from .backbone import Backbone, blocks_option

DEFAULT_BACKBONE = "openclip:ViT-B-32:openai"
SPEC_HELP = "expected openclip:MODEL[:TAG|:FILE], openclip:hf-hub:ORG/REPO, tiny[:SEED] or offline[+OPTION...][:DIR]"


def _head_blocks(spec: str, options: str) -> int:
    """``blocksN`` (N >= 1) from a CLIP spec's options; nothing else is an option there."""
    head_blocks = blocks_option(options)
    if head_blocks is None:
        raise ModelError(f"bad backbone spec {spec!r}: the only option of a CLIP backbone is +blocksN (N >= 1)")
    return head_blocks


def create_backbone(spec: str = DEFAULT_BACKBONE, preprocess: str = "clip") -> Backbone:
    kind, _, rest = spec.partition(":")
    if kind.startswith(("tiny+", "openclip+")):  # open_clip towers with the trunk cache before the last N blocks
        kind, _, options = kind.partition("+")
        head_blocks = _head_blocks(spec, options)
    else:
        head_blocks = 0
    backbone: Backbone
    if kind == "tiny":
        from .openclip_backbone import build_tiny

        try:
            seed = int(rest) if rest else 0
        except ValueError as exc:
            raise ModelError(f"bad backbone spec {spec!r}: the tiny seed must be an integer") from exc
        backbone = build_tiny(seed, head_blocks)
    elif kind == "openclip":
        from .openclip_backbone import build_openclip

        if rest.startswith("hf-hub:"):
            backbone = build_openclip(rest, None, head_blocks)
        else:
            model_name, _, pretrained = rest.partition(":")
            if not model_name:
                raise ModelError(f"bad backbone spec {spec!r}: {SPEC_HELP}")
            backbone = build_openclip(model_name, pretrained or None, head_blocks)
    elif kind == "offline" or kind.startswith("offline+"):
        from .offline_backbone import build_offline

        backbone = build_offline(kind, rest or None)
    else:
        raise ModelError(f"unknown backbone {spec!r}: {SPEC_HELP}")
    if preprocess != backbone.preprocess_mode:
        backbone.set_preprocess(preprocess)
    return backbone
