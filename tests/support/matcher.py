"""A tiny description-matcher encoder for fast tests: a random 1-layer, 16-wide BERT with
MiniLM's real tokenizer (from the installed package, no download), saved as an ``hf:`` folder."""

from __future__ import annotations

from pathlib import Path

import torch

from fashion_cir.models.sentence_encoder import resolve_encoder_path


def tiny_encoder(folder: Path) -> str:
    """Write the encoder into ``folder``; returns its matcher spec ``hf:<folder>``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder_path("minilm"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return f"hf:{folder}"
