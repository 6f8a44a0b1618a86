"""Encoding queries (CIRModel.encode_queries): the texts each encoder reads, image-only ("more
like this") and text-only queries, the query modes, and which encoder encodes which term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fashion_cir.models.cir import CIRModel
from fashion_cir.models.factory import create_backbone
from fashion_cir.models.fusion import AttributeSpace, Fusion
from fashion_cir.models.matcher import DescriptionMatcher


def test_texts_and_image_only_queries(tiny_model):
    image = torch.randn(2, tiny_model.backbone.feature_dim)
    parts = tiny_model.encode_queries(image, ["is red", "has long sleeves"], ["a white t-shirt", None])
    assert parts.texts == ("a white t-shirt, but is red", "has long sleeves")
    text = tiny_model.backbone.embed_texts(list(parts.texts))
    by_hand = F.normalize(F.normalize(image, dim=-1) + F.normalize(text, dim=-1), dim=-1)
    torch.testing.assert_close(tiny_model.query_vectors(parts, "sum"), by_hand, atol=1e-5, rtol=0)
    more_like_this = tiny_model.encode_queries(image, ["", ""])
    assert more_like_this.text is None and more_like_this.texts == ()
    torch.testing.assert_close(tiny_model.query_vectors(more_like_this), F.normalize(image, dim=-1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 captions but 1 descriptions"):
        tiny_model.encode_queries(image, ["a", "b"], ["x"])


def test_query_modes_and_text_only_queries(tiny_model):
    image = torch.randn(2, tiny_model.backbone.feature_dim, generator=torch.Generator().manual_seed(5)) * 3
    parts = tiny_model.encode_queries(image, ["is red", "has long sleeves"])
    text = tiny_model.backbone.embed_texts(["is red", "has long sleeves"])
    torch.testing.assert_close(tiny_model.query_vectors(parts, "text"), F.normalize(text, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny_model.query_vectors(parts, "image"), F.normalize(image, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        tiny_model.query_vectors(parts, "sum_raw"), F.normalize(image + text, dim=-1), atol=1e-5, rtol=0
    )
    text_only = tiny_model.encode_queries(None, ["is red", "has long sleeves"])  # no reference image
    assert text_only.reference is None
    torch.testing.assert_close(tiny_model.query_vectors(text_only), F.normalize(text, dim=-1), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    from support.matcher import tiny_encoder

    return tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


def _trained_matcher(encoder: str) -> DescriptionMatcher:
    """A matcher whose query encoder was trained (perturbed): its query and item sides differ."""
    matcher = DescriptionMatcher(encoder)
    with torch.no_grad():
        for param in matcher.query_encoder.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    return matcher


def _pooled(encoder: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Normalised mean of the last hidden states over real tokens, written out here (in eval mode:
    queries are encoded without dropout, whatever mode the model is in)."""
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        hidden = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    encoder.train(was_training)
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return mean / mean.norm(dim=-1, keepdim=True)


def test_each_term_is_read_by_its_encoder_and_training_mode_is_kept(encoder):
    model = CIRModel(
        create_backbone("tiny:4"),
        "sum",
        matcher=_trained_matcher(encoder),
        attribute_space=AttributeSpace(),
        fusion=Fusion(composed=0.5, caption=0.2, prompt=0.3, reference_description=-0.1),
    )
    model.train()
    image = torch.randn(2, model.backbone.feature_dim)
    records = [{"color": "white", "category": "t-shirt"}, None]
    parts = model.encode_queries(image, ["is red", "is blue"], ["a white t-shirt", None], records)
    assert model.training  # encoding queries leaves a training model in training mode
    tokenizer = model.matcher.tokenizer
    torch.testing.assert_close(
        parts.caption, _pooled(model.matcher.query_encoder, tokenizer, ["is red", "is blue"]), atol=1e-5, rtol=0
    )
    prompts = ["a white t-shirt, but is red", "is blue"]
    torch.testing.assert_close(
        parts.prompt, _pooled(model.matcher.query_encoder, tokenizer, prompts), atol=1e-5, rtol=0
    )
    described = _pooled(model.matcher.item_encoder, tokenizer, ["a white t-shirt"])  # the item side's encoder
    torch.testing.assert_close(parts.reference_description[0], described[0], atol=1e-5, rtol=0)
    assert not parts.reference_description[1].any()  # no description: zero
    space = model.attribute_space
    assert (
        parts.attributes["keep:category"][0, space.slices["category"].start + space.values["category"].index("t-shirt")]
        == 1
    )
    assert parts.attributes["away:color"][0].sum() == 1 and not parts.attributes["keep:category"][1].any()
    # a fusion that does not weigh a term does not compute it, unless every term is asked for
    model.fusion = Fusion(composed=1.0, caption=0.5)
    lean = model.encode_queries(image, ["is red", "is blue"], ["a white t-shirt", None])
    assert lean.prompt is None and lean.reference_description is None and lean.caption is not None
    assert model.encode_queries(image, ["is red", "is blue"], all_terms=True).prompt is not None


def test_a_shared_text_tower_reads_prompts_and_captions_in_one_pass(monkeypatch):
    """With the demo's layout (the matcher shares the offline backbone's MiniLM text tower, prompt
    template), one pass of the tower gives the text term (projected), the prompt term and the
    caption term; each equals that text encoded alone."""
    backbone = create_backbone("offline")
    model = CIRModel(
        backbone,
        matcher=DescriptionMatcher("minilm", query_encoder=backbone.text_tower),
        fusion=Fusion(composed=0.5, caption=0.3, prompt=0.2),
    ).eval()
    assert model.shares_text
    passes: list[list[str]] = []
    embed = model.matcher.embed
    monkeypatch.setattr(
        model.matcher, "embed", lambda texts, *a, **k: passes.append(list(texts)) or embed(texts, *a, **k)
    )
    captions = ["is red", "same but shorter and without the hood"]
    parts = model.encode_queries(torch.randn(2, backbone.feature_dim), captions, ["a white t-shirt", None])
    prompts = ["a white t-shirt, but is red", "same but shorter and without the hood"]
    assert passes == [prompts + captions]
    tokenizer = model.matcher.tokenizer
    torch.testing.assert_close(parts.caption, _pooled(backbone.text_tower, tokenizer, captions), atol=1e-5, rtol=0)
    torch.testing.assert_close(parts.prompt, _pooled(backbone.text_tower, tokenizer, prompts), atol=1e-5, rtol=0)
    alone = model.backbone.embed_texts(prompts)
    torch.testing.assert_close(parts.text, alone, atol=1e-5, rtol=0)
