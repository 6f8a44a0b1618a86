"""A tiny description-matcher encoder for fast tests: a random 16-wide BERT (1 layer by default) with
MiniLM's real tokenizer (from the installed package, no download), saved as an ``hf:`` folder."""

from __future__ import annotations

from pathlib import Path

import torch

from fashion_cir.models.sentence_encoder import resolve_encoder_path


def tiny_encoder(folder: Path, layers: int = 1, max_positions: int = 128) -> str:
    """Write the encoder into ``folder``; returns its matcher spec ``hf:<folder>``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder_path("minilm"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=max_positions,
    )
    BertModel(config).save_pretrained(folder)
    return f"hf:{folder}"


def multi_block_model(folder: Path):
    """A tiny CIR model whose items are all three blocks [image | description | attributes]: the
    tiny backbone, the tiny matcher encoder (written into ``folder``), category and colour
    attributes, and a fusion that weighs image, description and attribute terms."""
    from fashion_cir.models.cir import CIRModel
    from fashion_cir.models.factory import create_backbone
    from fashion_cir.models.fusion import AttributeSpace, Fusion
    from fashion_cir.models.matcher import DescriptionMatcher

    fusion = Fusion(
        composed=0.5,
        reference=0.1,
        caption=0.3,
        reference_description=0.2,
        attributes={"want:color": 0.4, "keep:category": 0.3, "away:color": 0.2},
    )
    return CIRModel(
        create_backbone("tiny"),
        matcher=DescriptionMatcher(tiny_encoder(folder)),
        fusion=fusion,
        attribute_space=AttributeSpace(names=["category", "color"]),
    ).eval()
