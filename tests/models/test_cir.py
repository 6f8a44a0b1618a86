"""Backbone factory errors, CIRModel save/load, query composition and prompt fitting."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from fashion_cir.data.captions import sentence_query
from fashion_cir.errors import ModelError
from fashion_cir.models.cir import CIRModel, compose_query, load_model
from fashion_cir.models.combiner import Combiner
from fashion_cir.models.factory import create_backbone


# -- factory ------------------------------------------------------------------------------------

def test_tiny_backbone_is_deterministic_per_seed(tiny_model):
    backbone = tiny_model.backbone
    assert backbone.spec == "tiny:0" and backbone.feature_dim == 32 and backbone.context_length == 77
    assert create_backbone("tiny:0").image_fingerprint() == backbone.image_fingerprint()
    assert create_backbone("tiny:1").image_fingerprint() != backbone.image_fingerprint()


@pytest.mark.parametrize("spec,pattern", [
    ("bogus:1", r"unknown backbone 'bogus:1'.*openclip:MODEL"),
    ("tiny:abc", r"tiny seed must be an integer"),
    ("openclip:", r"bad backbone spec 'openclip:'"),
    ("openclip:ViT-Nope-99:openai", r"unknown open_clip model 'ViT-Nope-99'"),
    ("openclip:ViT-B-32:no_such_tag", r"unknown pretrained tag 'no_such_tag' for ViT-B-32; known tags: .*openai"),
    ("openclip:ViT-B-32:/no/such/dir/vit-b-32.pt", r"checkpoint file not found: /no/such/dir/vit-b-32\.pt"),
    ("openclip:ViT-B-32", r"needs a pretrained tag or checkpoint file.*:random"),
])
def test_bad_backbone_specs_raise_model_error(spec, pattern):
    with pytest.raises(ModelError, match=pattern):
        create_backbone(spec)


def test_bad_preprocessing_is_a_model_error():
    with pytest.raises(ModelError, match="unknown preprocessing 'squash'"):
        create_backbone("tiny", preprocess="squash")


def test_pretrained_weights_without_network_explain_the_local_file_route():
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        create_backbone("openclip:ViT-B-32:openai")
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "could not load weights for ViT-B-32 (openai)" in message
    assert "--backbone openclip:ViT-B-32:/path/to/vit-b-32-openai.pt" in message
    assert "torch.save(model.state_dict()" in message
    assert elapsed < 20, f"offline failure took {elapsed:.1f} s"


# -- CIRModel -----------------------------------------------------------------------------------

def _features(model: CIRModel, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.backbone.encode_images(pixels), model.backbone.embed_texts(texts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model whose image tower and combiner were 'trained' (perturbed), saved to a folder."""
    torch.manual_seed(1)
    model = CIRModel(create_backbone("tiny"), "combiner", Combiner(32, 64, 128))
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if name.startswith("clip.visual."):
                param.add_(0.05 * torch.randn_like(param))
    model.mark_trained(["backbone.clip.visual."])
    model.eval()
    folder = model.save(tmp_path_factory.mktemp("model"), metadata={"stage": "test"})
    return model, folder


def test_save_load_round_trip_gives_identical_features(trained):
    model, folder = trained
    loaded = CIRModel.load(folder)
    assert loaded.query_mode == "combiner" and not loaded.training
    assert loaded.backbone.image_fingerprint() == model.backbone.image_fingerprint()
    assert loaded.backbone.image_fingerprint() != create_backbone("tiny").image_fingerprint()
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = ["is red with long sleeves", "is shorter", "has a v-neck"]
    image_a, text_a = _features(model, pixels, texts)
    image_b, text_b = _features(loaded, pixels, texts)
    assert torch.equal(image_a, image_b) and torch.equal(text_a, text_b)
    with torch.no_grad():
        assert torch.equal(model.compose(image_a, text_a), loaded.compose(image_b, text_b))
    assert load_model(folder).backbone.image_fingerprint() == model.backbone.image_fingerprint()


def test_weights_from_a_different_backbone_are_refused(trained, tmp_path):
    model, folder = trained
    # same key names, other shapes: a combiner trained on a 512-d backbone (e.g. ViT-B-32)
    foreign = {f"combiner.{k}": v for k, v in Combiner(512, 64, 128).state_dict().items()}
    copy = tmp_path / "shapes"
    copy.mkdir()
    meta = json.loads((folder / "model.json").read_text())
    meta.pop("weights_sha1")  # a folder without the weights' hash (older fashion-cir): the other checks apply
    (copy / "model.json").write_text(json.dumps(meta))
    torch.save(foreign, copy / "weights.pt")
    with pytest.raises(ModelError, match=r"weights\.pt does not match backbone tiny:0: shape mismatch"):
        CIRModel.load(copy)

    # keys this backbone does not have
    (copy / "weights.pt").unlink()
    torch.save({"backbone.clip.visual.trunk.stem.weight": torch.zeros(3)}, copy / "weights.pt")
    with pytest.raises(ModelError, match=r"does not match backbone tiny:0: unexpected"):
        CIRModel.load(copy)

    # same architecture and shapes, other weights (tiny:1's image tower): the fingerprint catches it
    other = CIRModel(create_backbone("tiny:1"), "combiner", Combiner(32, 64, 128))
    other.mark_trained(["backbone.clip.visual."])
    torch.save(other.trained_state_dict(), copy / "weights.pt")
    with pytest.raises(ModelError, match="fingerprint mismatch"):
        CIRModel.load(copy)

    (copy / "weights.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="corrupt weights file"):
        CIRModel.load(copy)


def test_load_errors(tmp_path):
    with pytest.raises(ModelError, match="no model.json"):
        CIRModel.load(tmp_path)
    (tmp_path / "model.json").write_text('{"backbone": "tiny"}')
    with pytest.raises(ModelError, match="missing field 'query_mode'"):
        CIRModel.load(tmp_path)
    with pytest.raises(ModelError, match="--backbone"):
        load_model()
    with pytest.raises(ModelError, match="unknown query mode 'avg'"):
        load_model(backbone="tiny", query_mode="avg")


# -- query composition --------------------------------------------------------------------------

def test_compose_query_modes():
    image = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[0.0, 1.0], [0.0, 10.0]])
    assert torch.allclose(compose_query("image", image, text), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(compose_query("text", image, text), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    root_half = 2 ** -0.5
    # sum normalises each side first: equal weight
    assert torch.allclose(compose_query("sum", image, text), torch.tensor([[root_half, root_half], [0.0, 1.0]]))
    # sum_raw adds raw features: the larger vector dominates
    assert torch.allclose(compose_query("sum_raw", image, text), F.normalize(torch.tensor([[3.0, 1.0], [0.0, 12.0]]), dim=-1))
    # non-unit text vectors that are not parallel to the image ones: both sides must be normalised
    image3 = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    text3 = torch.tensor([[0.0, 4.0, 3.0], [6.0, 0.0, 8.0]])
    # by hand: [1, 0, 0] + [0, .8, .6] = [1, .8, .6], norm sqrt(2); [0, 0, 1] + [.6, 0, .8] = [.6, 0, 1.8], norm sqrt(3.6)
    by_hand = torch.tensor([[1.0, 0.8, 0.6], [0.6, 0.0, 1.8]]) / torch.tensor([[2 ** 0.5], [3.6 ** 0.5]])
    assert torch.allclose(compose_query("sum", image3, text3), by_hand)
    assert torch.allclose(compose_query("sum", text3, image3), by_hand)  # symmetric in its two sides
    assert torch.allclose(compose_query("text", image3, text3), torch.tensor([[0.0, 0.8, 0.6], [0.6, 0.0, 0.8]]))
    assert torch.allclose(compose_query("image", image3, text3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(ModelError, match="needs a model with a Combiner"):
        compose_query("combiner", image, text)
    with pytest.raises(ModelError, match="unknown query mode"):
        compose_query("max", image, text)
    combiner = Combiner(2, 4, 8).eval()
    out = compose_query("combiner", image, text, combiner)
    assert out.shape == (2, 2) and torch.allclose(out.norm(dim=-1), torch.ones(2))


# -- prompt fitting -----------------------------------------------------------------------------

def test_fit_query_text_truncates_the_prompt_never_the_caption(tiny_model):
    backbone = tiny_model.backbone
    caption = "is red with long sleeves and a zip"
    prompt = " ".join(f"word{i}" for i in range(120))  # far beyond 77 tokens
    text = backbone.fit_query_text(prompt, caption, sentence_query)
    assert text.endswith(", but " + caption)
    assert backbone.count_tokens(text) <= backbone.context_length
    kept = text[: -len(", but " + caption)].split()
    assert kept and kept == prompt.split()[: len(kept)]  # a prefix of the prompt, word by word
    longer = sentence_query(" ".join(prompt.split()[: len(kept) + 1]), caption)
    assert backbone.count_tokens(longer) > backbone.context_length  # as much prompt as fits

    short = backbone.fit_query_text("a white t-shirt", caption, sentence_query)
    assert short == "a white t-shirt, but is red with long sleeves and a zip"
    huge_caption = " ".join(["very"] * 100) + " red"
    assert backbone.fit_query_text("a white t-shirt", huge_caption, sentence_query) == huge_caption
    assert backbone.fit_query_text(None, caption, sentence_query) == caption
    # through the model: the prompt template uses it, other templates ignore the prompt
    assert tiny_model.query_text(caption, prompt) == text
    assert CIRModel(backbone, text_template="caption").query_text(caption, prompt) == caption
