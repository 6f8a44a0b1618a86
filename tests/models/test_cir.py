"""Backbone factory errors, CIRModel save/load (a crash mid-save leaves the old or the new model),
query composition and prompt fitting."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fashion_cir.models.cir as cir_module
from fashion_cir.data.captions import sentence_query
from fashion_cir.errors import ModelError
from fashion_cir.models.cir import CIRModel, compose_query, load_model
from fashion_cir.models.combiner import Combiner
from fashion_cir.models.factory import create_backbone
from fashion_cir.models.fusion import AttributeSpace, Fusion, QueryParts

# -- factory ------------------------------------------------------------------------------------


def test_tiny_backbone_is_deterministic_per_seed(tiny_model):
    backbone = tiny_model.backbone
    assert backbone.spec == "tiny:0" and backbone.feature_dim == 32 and backbone.context_length == 77
    assert create_backbone("tiny:0").image_fingerprint() == backbone.image_fingerprint()
    assert create_backbone("tiny:1").image_fingerprint() != backbone.image_fingerprint()


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ("bogus:1", r"unknown backbone 'bogus:1'.*openclip:MODEL"),
        ("tiny:abc", r"tiny seed must be an integer"),
        ("openclip:", r"bad backbone spec 'openclip:'"),
        ("openclip:ViT-Nope-99:openai", r"unknown open_clip model 'ViT-Nope-99'"),
        ("openclip:ViT-B-32:no_such_tag", r"unknown pretrained tag 'no_such_tag' for ViT-B-32; known tags: .*openai"),
        ("openclip:ViT-B-32:/no/such/dir/vit-b-32.pt", r"checkpoint file not found: /no/such/dir/vit-b-32\.pt"),
        ("openclip:ViT-B-32", r"needs a pretrained tag or checkpoint file.*:random"),
    ],
)
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
    with pytest.raises(ModelError) as info:
        load_model()
    assert _message(info) == "give a trained model folder (--model DIR) or a backbone spec (--backbone SPEC)"
    with pytest.raises(ModelError, match="unknown query mode 'avg'"):
        load_model(backbone="tiny", query_mode="avg")


# -- query composition --------------------------------------------------------------------------


def test_compose_query_modes():
    image = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[0.0, 1.0], [0.0, 10.0]])
    assert torch.allclose(compose_query("image", image, text), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(compose_query("text", image, text), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    root_half = 2**-0.5
    # sum normalises each side first: equal weight
    assert torch.allclose(compose_query("sum", image, text), torch.tensor([[root_half, root_half], [0.0, 1.0]]))
    # sum_raw adds raw features: the larger vector dominates
    assert torch.allclose(
        compose_query("sum_raw", image, text), F.normalize(torch.tensor([[3.0, 1.0], [0.0, 12.0]]), dim=-1)
    )
    # non-unit text vectors that are not parallel to the image ones: both sides must be normalised
    image3 = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    text3 = torch.tensor([[0.0, 4.0, 3.0], [6.0, 0.0, 8.0]])
    # by hand: [1, 0, 0] + [0, .8, .6] = [1, .8, .6], norm sqrt(2); [0, 0, 1] + [.6, 0, .8] = [.6, 0, 1.8], norm sqrt(3.6)
    by_hand = torch.tensor([[1.0, 0.8, 0.6], [0.6, 0.0, 1.8]]) / torch.tensor([[2**0.5], [3.6**0.5]])
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


# -- model construction, vectors, fingerprint, save/load, publish, attributes ---------------------
# Expectations below are computed by hand or by the plain helpers here, never by the functions under test.


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x * x).sum(-1, keepdim=True).sqrt()


REFUSED = "not a tensor file torch.load can read safely (weights_only=True)"  # what torch.load refuses, in short


def _message(info) -> str:
    message = str(info.value)
    assert "\n" not in message  # one line, as the CLI prints it
    return message


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    from support.matcher import tiny_encoder

    return tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


def _matcher(encoder: str):
    from fashion_cir.models.matcher import DescriptionMatcher

    return DescriptionMatcher(encoder)


def test_construction_defaults_and_bad_settings():
    backbone = create_backbone("tiny")
    model = CIRModel(backbone)
    assert (model.query_mode, model.text_template, model.prompt_source) == ("sum", "prompt", "catalog")
    assert model.combiner is None and model.matcher is None and model.attribute_heads is None
    assert model.attribute_space is None and model.fusion == Fusion(composed=1.0)  # the plain composed query
    assert model.matcher_trained is False and model.saved_prefixes == []
    assert model.source is None and model.descriptions_source is None
    with pytest.raises(ModelError) as info:
        CIRModel(backbone, "avg")
    assert _message(info) == "unknown query mode 'avg'; choose one of ('image', 'text', 'sum', 'sum_raw', 'combiner')"
    with pytest.raises(ModelError) as info:
        CIRModel(backbone, prompt_source="guessed")
    assert _message(info) == "unknown prompt source 'guessed'; choose one of ('catalog', 'predicted', 'none')"
    # the caller's prefix list is copied, and marking a prefix twice lists it once
    prefixes = ["backbone.clip.visual."]
    model = CIRModel(backbone, saved_prefixes=prefixes)
    model.mark_trained(["combiner.", "backbone.clip.visual.", "combiner.", "backbone.clip.transformer."])
    assert model.saved_prefixes == ["backbone.clip.visual.", "combiner.", "backbone.clip.transformer."]
    assert prefixes == ["backbone.clip.visual."]


def test_compose_query_error_messages_and_leading_batch_dimensions():
    image = torch.tensor([[[3.0, 0.0, 4.0], [0.0, 2.0, 0.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, -5.0]]])  # [2, 2, 3]
    text = torch.tensor([[[0.0, 6.0, 8.0], [1.0, 0.0, 0.0]], [[0.0, 0.0, 2.0], [3.0, 4.0, 0.0]]])
    # each [.., 3] row normalised on its own (the last dimension, not dim 1)
    assert torch.allclose(compose_query("image", image, text), image / image.norm(dim=2, keepdim=True))
    assert torch.allclose(compose_query("text", image, text), text / text.norm(dim=2, keepdim=True))
    summed = image / image.norm(dim=2, keepdim=True) + text / text.norm(dim=2, keepdim=True)
    assert torch.allclose(compose_query("sum", image, text), summed / summed.norm(dim=2, keepdim=True))
    raw = image + text
    assert torch.allclose(compose_query("sum_raw", image, text), raw / raw.norm(dim=2, keepdim=True))
    with pytest.raises(ModelError) as info:
        compose_query("combiner", image, text)
    assert _message(info) == "query mode 'combiner' needs a model with a Combiner head"
    with pytest.raises(ModelError) as info:
        compose_query("max", image, text)
    assert _message(info) == "unknown query mode 'max'; choose one of ('image', 'text', 'sum', 'sum_raw', 'combiner')"
    # the model's mode unless one is given
    model = CIRModel(create_backbone("tiny"), "sum_raw")
    assert torch.allclose(model.compose(image, text), raw / raw.norm(dim=2, keepdim=True))
    assert torch.allclose(model.compose(image, text, mode="text"), text / text.norm(dim=2, keepdim=True))


def test_item_vectors_with_and_without_a_matcher(encoder):
    """Items are blocks: the normalised image, the description features as given, the attribute
    one-hots as given (the weights live on the query side, never on the items)."""
    gen = torch.Generator().manual_seed(2)
    raw = (torch.randn(3, 32, generator=gen) * torch.tensor([[0.5], [3.0], [7.0]])).double()  # non-unit, float64
    described = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    plain = CIRModel(create_backbone("tiny"))
    assert plain.block_dims() == {"image": 32}
    vectors = plain.item_vectors(raw, described)  # no matcher: descriptions are not used
    assert vectors.dtype == torch.float32 and vectors.shape == (3, 32)
    assert torch.allclose(vectors, _unit(raw).float(), atol=1e-6)
    matched = CIRModel(create_backbone("tiny"), matcher=_matcher(encoder), fusion=Fusion(composed=0.64, caption=0.36))
    assert matched.block_dims() == {"image": 32, "description": 16}
    vectors = matched.item_vectors(raw, described)
    assert vectors.dtype == torch.float32 and vectors.shape == (3, 48)
    assert torch.allclose(vectors[:, :32], _unit(raw).float(), atol=1e-6)
    assert torch.allclose(vectors[:, 32:], described.float(), atol=1e-6)
    batched = plain.item_vectors(raw.view(3, 4, 8))  # leading dimensions: each last-dimension row normalised
    assert torch.allclose(batched, _unit(raw.view(3, 4, 8)).float(), atol=1e-6)
    undescribed = matched.item_vectors(raw)  # no descriptions: zero rows on the description side
    assert undescribed.shape == (3, 48) and torch.equal(undescribed[:, 32:], torch.zeros(3, 16))
    assert torch.allclose(undescribed[:, :32], _unit(raw).float(), atol=1e-6)
    space = AttributeSpace(names=["color", "length"])
    full = CIRModel(create_backbone("tiny"), matcher=_matcher(encoder), attribute_space=space)
    assert full.block_dims() == {"image": 32, "description": 16, "attributes": space.dim}
    hot = torch.zeros(3, space.dim, dtype=torch.float64)
    hot[0, 1] = hot[2, space.dim - 1] = 1.0
    vectors = full.item_vectors(raw, described, hot)
    assert vectors.shape == (3, 48 + space.dim)
    assert torch.allclose(vectors, torch.cat([_unit(raw), described, hot], dim=1).float(), atol=1e-6)
    unknown = full.item_vectors(raw, None, hot)  # described by attributes only: a zero description block
    assert torch.equal(unknown[:, 32:48], torch.zeros(3, 16)) and torch.equal(unknown[:, 48:], hot.float())


def test_query_vectors_compose_the_sides_there_are_and_join_the_matcher(encoder):
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(2, 32, generator=gen) * torch.tensor([[4.0], [0.3]])
    text = torch.randn(2, 32, generator=gen) * torch.tensor([[0.2], [9.0]])
    torch.manual_seed(0)
    model = CIRModel(create_backbone("tiny"), "combiner", Combiner(32, 64, 128)).eval()
    with pytest.raises(ModelError) as info:
        model.query_vectors(QueryParts(None, None))
    assert _message(info) == "a query needs a reference image, a text, or both"
    # a missing side: the other alone, whatever the model's mode (here combiner)
    assert torch.allclose(model.query_vectors(QueryParts(None, text)), _unit(text), atol=1e-6)
    assert torch.allclose(model.query_vectors(QueryParts(image, None)), _unit(image), atol=1e-6)
    by_hand = _unit(_unit(image) + _unit(text))
    assert torch.allclose(model.query_vectors(QueryParts(image, text), mode="sum"), by_hand, atol=1e-6)
    assert torch.allclose(model.query_vectors(QueryParts(image, text), mode="sum_raw"), _unit(image + text), atol=1e-6)
    with torch.no_grad():
        combined = model.query_vectors(QueryParts(image, text))  # the model's own mode
        assert torch.allclose(combined, model.combiner(image, text), atol=1e-6)
    assert not torch.allclose(combined, by_hand, atol=1e-2)
    # the reference term: the reference image alone, beside the composed query
    mixed = model.query_vectors(QueryParts(image, text), mode="sum", fusion=Fusion(composed=0.7, reference=0.3))
    assert torch.allclose(mixed, 0.7 * by_hand + 0.3 * _unit(image), atol=1e-6)

    model.matcher = _matcher(encoder)
    model.fusion = Fusion(composed=0.64, caption=0.36)
    matched = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    vectors = model.query_vectors(QueryParts(image, text, caption=matched), mode="sum")
    assert vectors.dtype == torch.float32 and vectors.shape == (2, 48)
    assert torch.allclose(vectors[:, :32], 0.64 * by_hand, atol=1e-6)
    assert torch.allclose(vectors[:, 32:], 0.36 * matched.float(), atol=1e-6)
    image_only = model.query_vectors(QueryParts(image, None))  # no matcher features: zeros on the matcher side
    assert torch.allclose(image_only[:, :32], 0.64 * _unit(image), atol=1e-6)
    assert torch.equal(image_only[:, 32:], torch.zeros(2, 16))
    text_only = model.query_vectors(QueryParts(None, text, caption=matched))
    assert torch.allclose(text_only, torch.cat([0.64 * _unit(text), 0.36 * matched.float()], dim=1), atol=1e-6)
    # every description term lands in the description block, each with its weight
    prompt, described = torch.randn(2, 16, generator=gen), torch.randn(2, 16, generator=gen)
    fusion = Fusion(composed=0.5, reference=0.2, caption=0.3, prompt=0.1, reference_description=-0.1)
    vectors = model.query_vectors(QueryParts(image, text, matched, prompt, described), mode="sum", fusion=fusion)
    assert torch.allclose(vectors[:, :32], 0.5 * by_hand + 0.2 * _unit(image), atol=1e-6)
    assert torch.allclose(vectors[:, 32:], 0.3 * matched.float() + 0.1 * prompt - 0.1 * described, atol=1e-6)


def test_trained_state_dict_holds_the_trained_portable_and_combiner_weights(encoder):
    backbone = create_backbone("tiny")
    own = CIRModel(backbone, matcher=_matcher(encoder))
    assert own.trained_state_dict() == {}  # nothing trained, nothing the spec cannot rebuild, no matcher weights
    own.mark_trained(["backbone.clip.ln_final."])
    assert sorted(own.trained_state_dict()) == ["backbone.clip.ln_final.bias", "backbone.clip.ln_final.weight"]
    # a backbone whose spec alone does not rebuild it names the parts a folder must hold
    backbone.portable_spec = lambda: ("tiny:0", ["clip.logit_scale"])
    model = CIRModel(backbone, "combiner", Combiner(32, 8, 16))
    state = model.trained_state_dict()
    expected = ["backbone.clip.logit_scale"] + [f"combiner.{k}" for k in Combiner(32, 8, 16).state_dict()]
    assert sorted(state) == sorted(expected)
    assert torch.equal(state["backbone.clip.logit_scale"], backbone.clip.logit_scale.detach())


def _fingerprint_by_hand(model: CIRModel) -> str:
    """The documented definition: sha1 of the settings (backbone, image fingerprint, query mode, text
    template, matcher config, fusion weights, attribute names) as JSON with sorted keys, then each
    state tensor's name and raw bytes in name order (the model's state, then the matcher's query encoder)."""
    import hashlib

    matcher = model.matcher
    space = model.attribute_space
    settings = [
        ("attributes", None if space is None else list(space.names)),
        ("backbone", model.backbone.spec),
        (
            "fusion",
            {
                "attributes": dict(sorted(model.fusion.attributes.items())),
                **{
                    t: getattr(model.fusion, t)
                    for t in ("caption", "composed", "prompt", "reference", "reference_description")
                },
            },
        ),
        ("image", model.backbone.image_fingerprint()),
        ("matcher", None if matcher is None else dict(sorted(matcher.config().items()))),
        ("query_mode", model.query_mode),
        ("text_template", model.text_template),
    ]
    blob = json.dumps(dict(settings)).encode()
    states = [model.state_dict()]
    if matcher is not None:
        states.append(matcher.query_encoder.state_dict())
    for state in states:
        for name in sorted(state):
            blob += name.encode() + state[name].numpy().tobytes()
    return hashlib.sha1(blob).hexdigest()


def test_fingerprint_is_the_settings_and_every_weight(encoder):
    torch.manual_seed(0)
    model = CIRModel(
        create_backbone("tiny"),
        "combiner",
        Combiner(32, 8, 16),
        matcher=_matcher(encoder),
        fusion=Fusion(composed=0.6, caption=0.4, attributes={"want:color": 0.2}),
    )
    first = model.fingerprint()
    assert first == _fingerprint_by_hand(model) and len(first) == 40
    assert model.fingerprint() == first  # nothing changed
    plain = CIRModel(create_backbone("tiny"))
    assert plain.fingerprint() == _fingerprint_by_hand(plain)

    def changed() -> bool:
        return model.fingerprint() != first

    # every weight counts, trained or not (nothing is marked trained here)
    for tensor in [
        model.backbone.clip.visual.conv1.weight,
        model.backbone.clip.token_embedding.weight,
        model.backbone.clip.logit_scale,
        next(model.combiner.parameters()),
        model.matcher.query_encoder.embeddings.word_embeddings.weight,
        model.matcher.item_encoder.embeddings.word_embeddings.weight,
    ]:
        with torch.no_grad():
            before = tensor.detach().clone()
            tensor.view(-1)[0] += 1e-3
            assert changed()
            tensor.copy_(before)
        assert not changed()
    # every setting that decides scores counts; settings that do not, do not
    for owner, name, value in [
        (model, "query_mode", "sum"),
        (model, "text_template", "caption"),
        (model, "fusion", Fusion(composed=0.5, caption=0.4, attributes={"want:color": 0.2})),
        (model, "fusion", Fusion(composed=0.6, prompt=0.4, attributes={"want:color": 0.2})),
        (model, "fusion", Fusion(composed=0.6, caption=0.4, attributes={"want:color": 0.3})),
        (model, "attribute_space", AttributeSpace(names=["color"])),
    ]:
        old = getattr(owner, name)
        setattr(owner, name, value)
        assert changed(), name
        setattr(owner, name, old)
    model.backbone.set_preprocess("targetpad")
    assert changed()
    model.backbone.set_preprocess("clip")
    model.prompt_source, model.saved_prefixes = "predicted", ["combiner."]
    assert not changed()
    matcher, model.matcher = model.matcher, None
    assert changed()
    model.matcher = matcher
    assert not changed()


def _sha1(path) -> str:
    import hashlib

    return hashlib.sha1(path.read_bytes()).hexdigest()


def _heads():
    """Attribute heads whose predictions are known by hand: colour follows the sign of the first
    normalised feature (logits +-10 u0), kids is True at 0.75 (bias log 3, no weights)."""
    from fashion_cir.models.attributes import AttributeHeads

    heads = AttributeHeads(32, {"colour": ["red", "blue"], "kids": [False, True]}, info={"trained_on": "test"})
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
        heads.heads["colour"].weight[0, 0], heads.heads["colour"].weight[1, 0] = 10.0, -10.0
        heads.heads["kids"].bias[1] = torch.log(torch.tensor(3.0))
    return heads


@pytest.fixture(scope="module")
def saved(encoder, tmp_path_factory):
    """A model with every saved field set: trained image tower and text blocks, an untrained token
    embedding that was changed anyway (not saved), a combiner, a trained matcher, attribute heads."""
    torch.manual_seed(2)
    backbone = create_backbone("tiny")
    backbone.set_preprocess("targetpad")
    model = CIRModel(
        backbone,
        "combiner",
        Combiner(32, 8, 16),
        ["backbone.clip.visual."],
        "caption",
        "predicted",
        matcher=_matcher(encoder),
        fusion=Fusion(composed=0.75, prompt=0.25, attributes={"keep:color": 0.1}),
        attribute_space=AttributeSpace(names=["color", "length"]),
    )
    model.mark_trained(["backbone.clip.transformer."])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(
                (
                    "backbone.clip.visual.",
                    "backbone.clip.transformer.",
                    "backbone.clip.token_embedding.",
                    "matcher.query_encoder.",
                )
            ):
                param.add_(0.05 * torch.randn_like(param))
    model.matcher_trained = True
    model.descriptions_source = "attributes.jsonl"
    model.attach_heads(_heads())
    folder = tmp_path_factory.mktemp("saved") / "runs" / "model"  # parents are created
    assert model.save(folder, metadata={"stage": "stage2", "epochs": 3}) == folder
    return model, folder


def test_save_writes_every_field_and_only_trained_weights(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [
        "attributes.json",
        "attributes.pt",
        "matcher.pt",
        "model.json",
        "weights.pt",
    ]  # no temporary file left
    meta = json.loads((folder / "model.json").read_text())
    versions = meta.pop("versions")
    assert isinstance(versions, dict) and versions
    assert meta == {
        "format": "fashion-cir-model/1",
        "backbone": "tiny:0",
        "preprocess": "targetpad",
        "query_mode": "combiner",
        "text_template": "caption",
        "prompt_source": "predicted",
        "combiner": {"projection_dim": 8, "hidden_dim": 16},
        "matcher": {"spec": model.matcher.spec, "shared": False, "trained": True},
        "matcher_sha1": _sha1(folder / "matcher.pt"),
        "descriptions": "attributes.jsonl",
        "fusion": {
            "composed": 0.75,
            "reference": 0.0,
            "caption": 0.0,
            "prompt": 0.25,
            "reference_description": 0.0,
            "attributes": {"keep:color": 0.1},
        },
        "attributes": {"names": ["color", "length"]},
        "saved_prefixes": ["backbone.clip.visual.", "backbone.clip.transformer."],
        "image_fingerprint": model.backbone.image_fingerprint(),
        "weights_sha1": _sha1(folder / "weights.pt"),
        "stage": "stage2",
        "epochs": 3,
    }
    weights = torch.load(folder / "weights.pt", weights_only=True)
    state = model.state_dict()
    wanted = [
        k
        for k in state
        if k.split(".")[0] == "combiner" or k.startswith(("backbone.clip.visual.", "backbone.clip.transformer."))
    ]
    assert sorted(weights) == sorted(wanted)
    assert all(torch.equal(weights[k], state[k]) for k in wanted)
    matcher = torch.load(folder / "matcher.pt", weights_only=True)
    query_state = model.matcher.query_encoder.state_dict()
    assert sorted(matcher) == sorted(query_state) and all(torch.equal(matcher[k], query_state[k]) for k in query_state)


def test_load_restores_every_field_and_weight(saved):
    model, folder = saved
    loaded = CIRModel.load(folder)
    assert not loaded.training and loaded.source == folder.resolve()
    assert (loaded.query_mode, loaded.text_template, loaded.prompt_source) == ("combiner", "caption", "predicted")
    assert loaded.backbone.preprocess_mode == "targetpad" and loaded.combiner.config() == {
        "projection_dim": 8,
        "hidden_dim": 16,
    }
    assert loaded.matcher.config() == {"spec": model.matcher.spec, "shared": False}
    assert loaded.fusion == Fusion(composed=0.75, prompt=0.25, attributes={"keep:color": 0.1})
    assert loaded.attribute_space.names == ["color", "length"]
    assert loaded.matcher_trained is True and loaded.descriptions_source == "attributes.jsonl"
    assert loaded.saved_prefixes == ["backbone.clip.visual.", "backbone.clip.transformer."]
    fresh = create_backbone("tiny").state_dict()
    original, restored = model.state_dict(), loaded.state_dict()
    assert sorted(original) == sorted(restored)
    for name in original:
        if name.startswith("backbone.clip.token_embedding."):  # changed but not trained: rebuilt from the spec
            assert torch.equal(restored[name], fresh[name.removeprefix("backbone.")])
            assert not torch.equal(restored[name], original[name])
        else:
            assert torch.equal(restored[name], original[name]), name
    assert loaded.attribute_heads.info == {"trained_on": "test"}
    features = torch.tensor([[2.0] + [0.0] * 31, [-1.0] + [1.0] * 31])
    assert loaded.predict_attributes(features) == model.predict_attributes(features)


def test_predict_attributes_and_attach_heads():
    model = CIRModel(create_backbone("tiny"))
    with pytest.raises(ModelError) as info:
        model.predict_attributes(torch.zeros(1, 32))
    assert (
        _message(info)
        == "this model has no attribute heads: train them with `fashion-cir attributes train --model DIR`"
    )
    from fashion_cir.models.attributes import AttributeHeads

    with pytest.raises(ModelError) as info:
        model.attach_heads(AttributeHeads(16, {"kids": [False, True]}))
    assert _message(info) == "attribute heads take 16-d features but the model's image features are 32-d"
    assert model.attribute_heads is None
    model.attach_heads(_heads())
    # first row: u0 = 3/5 -> red with p = 1 / (1 + e^-12); second: u0 = -1/sqrt(2) -> blue, p = 1 / (1 + e^(-20/sqrt(2)))
    features = torch.tensor([[3.0, 4.0] + [0.0] * 30, [-1.0, 1.0] + [0.0] * 30])
    red = 1 / (1 + torch.exp(torch.tensor(-12.0))).item()
    blue = 1 / (1 + torch.exp(torch.tensor(-20 / 2**0.5))).item()
    assert model.predict_attributes(features) == [
        {"colour": {"value": "red", "confidence": round(red, 4)}, "kids": {"value": True, "confidence": 0.75}},
        {"colour": {"value": "blue", "confidence": round(blue, 4)}, "kids": {"value": True, "confidence": 0.75}},
    ]
    model.attach_heads(None)
    assert model.attribute_heads is None


def _copy(folder, destination):
    import shutil

    shutil.copytree(folder, destination)
    return destination


def test_resave_without_a_trained_matcher_removes_its_weights(saved, encoder, tmp_path):
    model, folder = saved
    copy = _copy(folder, tmp_path / "copy")
    model.matcher_trained = False
    try:
        model.save(copy)
    finally:
        model.matcher_trained = True
    assert not (copy / "matcher.pt").exists() and not (copy / ".matcher.pt.tmp").exists()
    meta = json.loads((copy / "model.json").read_text())
    assert meta["matcher"]["trained"] is False and meta["matcher_sha1"] is None and "stage" not in meta
    loaded = CIRModel.load(copy)
    assert loaded.matcher_trained is False
    pretrained = _matcher(encoder).query_encoder.state_dict()
    assert all(torch.equal(v, pretrained[k]) for k, v in loaded.matcher.query_encoder.state_dict().items())


def test_an_interrupted_save_loads_as_the_new_model(saved, tmp_path):
    model, folder = saved
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.backbone.encode_images(pixels)
    # crash after model.json, before the renames: the finished temporary files are the model's
    copy = _copy(folder, tmp_path / "pending")
    (copy / "weights.pt").rename(copy / ".weights.pt.tmp")
    (copy / "matcher.pt").rename(copy / ".matcher.pt.tmp")
    loaded = CIRModel.load(copy)
    assert (copy / "weights.pt").is_file() and not (copy / ".weights.pt.tmp").exists()  # the rename is completed
    assert (copy / "matcher.pt").is_file() and not (copy / ".matcher.pt.tmp").exists()
    with torch.no_grad():
        assert torch.equal(loaded.backbone.encode_images(pixels), expected)
    # the rename cannot be completed (something else is in the way): the temporary file is read
    blocked = _copy(folder, tmp_path / "blocked")
    (blocked / "weights.pt").rename(blocked / ".weights.pt.tmp")
    (blocked / "weights.pt").mkdir()
    (blocked / "weights.pt" / "in-the-way").write_text("x")
    loaded = CIRModel.load(blocked)
    assert (blocked / ".weights.pt.tmp").is_file()
    with torch.no_grad():
        assert torch.equal(loaded.backbone.encode_images(pixels), expected)


def test_mismatched_missing_or_corrupt_weights_are_one_line_errors(saved, tmp_path):
    from fashion_cir.errors import DataError

    model, folder = saved
    meta = json.loads((folder / "model.json").read_text())
    for name, key in [("weights.pt", "weights_sha1"), ("matcher.pt", "matcher_sha1")]:
        for damage in ("missing", "other bytes"):
            copy = _copy(folder, tmp_path / f"{name}-{damage}")
            if damage == "missing":
                (copy / name).unlink()
            else:
                (copy / name).write_bytes(b"other bytes")
            with pytest.raises(ModelError) as info:
                CIRModel.load(copy)
            assert _message(info) == (
                f"{copy / name} does not match {copy / 'model.json'} (sha1 {meta[key]}): a save "
                "was interrupted or the files were mixed up; re-run the step that wrote the model"
            )
    # folders written before weights were hashed: the files are read as they are
    older = _copy(folder, tmp_path / "older")
    (older / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if not k.endswith("sha1")}))
    (older / "matcher.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError) as info:
        CIRModel.load(older)
    assert _message(info) == f"missing or corrupt matcher weights {older / 'matcher.pt'}: " + REFUSED
    torch.save({"not.a.bert.key": torch.zeros(2)}, older / "matcher.pt")  # torch's reason spans lines: one line here
    with pytest.raises(ModelError) as info:
        CIRModel.load(older)
    assert _message(info).startswith(
        f"missing or corrupt matcher weights {older / 'matcher.pt'}: Error(s) in loading "
        "state_dict for BertModel: Missing key(s) in state_dict: "
    )
    (older / "matcher.pt").unlink()
    with pytest.raises(ModelError) as info:
        CIRModel.load(older)
    assert _message(info) == (
        f"missing or corrupt matcher weights {older / 'matcher.pt'}: [Errno 2] No such file or "
        f"directory: '{older / 'matcher.pt'}'"
    )
    (older / "matcher.pt").write_bytes((folder / "matcher.pt").read_bytes())
    (older / "weights.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError) as info:
        CIRModel.load(older)
    assert _message(info) == f"corrupt weights file {older / 'weights.pt'}: " + REFUSED
    (
        older / "weights.pt"
    ).unlink()  # no weights at all: the backbone as its spec builds it, which is not the trained one
    with pytest.raises(ModelError) as info:
        CIRModel.load(older)
    assert _message(info) == (
        f"{older}: image encoder fingerprint mismatch after loading (expected "
        f"{meta['image_fingerprint']}); the backbone weights it was trained from are not the ones "
        "available here"
    )
    (older / "model.json").write_text('{\n  "backbone": "tiny",,\n}')
    with pytest.raises(DataError) as info:
        CIRModel.load(older)
    assert _message(info).startswith(f"malformed model file {older / 'model.json'}: ")
    (older / "model.json").write_text('{"query_mode": "sum"}')
    with pytest.raises(ModelError) as info:
        CIRModel.load(older)
    assert _message(info) == f"{older / 'model.json'}: missing field 'backbone'"
    (older / "model.json").unlink()
    with pytest.raises(ModelError) as info:
        CIRModel.load(older)
    assert _message(info) == f"not a fashion-cir model folder (no model.json): {older}"


def test_foreign_weights_name_at_most_three_keys(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"backbone": "tiny", "query_mode": "sum"}))
    torch.save({f"backbone.extra.{i}": torch.zeros(1) for i in range(5)}, tmp_path / "weights.pt")
    with pytest.raises(ModelError) as info:
        CIRModel.load(tmp_path)
    assert _message(info) == (
        f"{tmp_path / 'weights.pt'} does not match backbone tiny: unexpected "
        "['backbone.extra.0', 'backbone.extra.1', 'backbone.extra.2']"
    )
    state = create_backbone("tiny").state_dict()
    wrong = {f"backbone.{k}": torch.zeros(3, 3, 3) for k in list(state)[:5]}
    torch.save(wrong, tmp_path / "weights.pt")
    with pytest.raises(ModelError) as info:
        CIRModel.load(tmp_path)
    shapes = ", ".join(f"'backbone.{k} (3, 3, 3) vs {tuple(state[k].shape)}'" for k in list(state)[:3])
    assert _message(info) == f"{tmp_path / 'weights.pt'} does not match backbone tiny: shape mismatch [{shapes}]"


def test_missing_optional_fields_load_their_defaults(encoder, tmp_path):
    (tmp_path / "model.json").write_text(
        json.dumps({"backbone": "tiny", "query_mode": "image", "matcher": {"spec": encoder}})
    )
    model = CIRModel.load(tmp_path)
    assert (model.query_mode, model.text_template, model.prompt_source) == ("image", "prompt", "catalog")
    assert model.backbone.preprocess_mode == "clip" and model.combiner is None and model.saved_prefixes == []
    assert model.matcher.config() == {"spec": encoder, "shared": False} and model.attribute_space is None
    assert model.fusion == Fusion(
        composed=0.5, caption=0.5
    )  # a folder from before fusions: the matcher's default weight
    assert model.matcher_trained is False and model.descriptions_source is None and model.attribute_heads is None
    assert model.backbone.image_fingerprint() == create_backbone("tiny").image_fingerprint()
    # a matcher entry without a spec is the default encoder, all-MiniLM-L6-v2
    (tmp_path / "model.json").write_text(
        json.dumps({"backbone": "tiny", "query_mode": "sum", "matcher": {"template": "prompt"}})
    )
    old = CIRModel.load(tmp_path)
    minilm = old.matcher
    assert minilm.config() == {"spec": "minilm", "shared": False} and minilm.dim == 384
    assert old.fusion == Fusion(composed=0.5, prompt=0.5)  # its template names the term its weight was on
    (tmp_path / "model.json").write_text(json.dumps({"backbone": "tiny", "query_mode": "sum"}))
    assert CIRModel.load(tmp_path).fusion == Fusion(composed=1.0)
    zero_shot = load_model(backbone="tiny:1", query_mode="text", preprocess="targetpad")
    assert (zero_shot.query_mode, zero_shot.backbone.spec, zero_shot.backbone.preprocess_mode) == (
        "text",
        "tiny:1",
        "targetpad",
    )
    assert not zero_shot.training and load_model(backbone="tiny").query_mode == "sum"
    assert load_model(backbone="tiny").backbone.preprocess_mode == "clip"


def test_a_zero_shot_model_saves_no_weights_and_no_optional_parts(tmp_path):
    model = CIRModel(create_backbone("tiny"), "sum_raw")
    model.save(tmp_path / "zero-shot")
    meta = json.loads((tmp_path / "zero-shot" / "model.json").read_text())
    assert {
        k: meta[k] for k in ("combiner", "matcher", "matcher_sha1", "descriptions", "saved_prefixes", "attributes")
    } == {
        "combiner": None,
        "matcher": None,
        "matcher_sha1": None,
        "descriptions": None,
        "saved_prefixes": [],
        "attributes": None,
    }
    assert meta["fusion"] == {
        "composed": 1.0,
        "reference": 0.0,
        "caption": 0.0,
        "prompt": 0.0,
        "reference_description": 0.0,
        "attributes": {},
    }
    assert torch.load(tmp_path / "zero-shot" / "weights.pt", weights_only=True) == {}
    assert sorted(p.name for p in (tmp_path / "zero-shot").iterdir()) == ["model.json", "weights.pt"]
    loaded = CIRModel.load(tmp_path / "zero-shot")
    assert loaded.query_mode == "sum_raw" and loaded.combiner is None and loaded.matcher is None


def test_publish_model_replaces_the_destination(saved, tmp_path):
    from fashion_cir.models.cir import publish_model

    _, folder = saved
    destination = tmp_path / "best"
    assert publish_model(folder, destination) == destination
    assert sorted(p.name for p in destination.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert all((destination / p.name).read_bytes() == p.read_bytes() for p in folder.iterdir())
    # again, over an older model and a staging folder left by a crash: nothing of either survives
    (destination / "old-file").write_text("old")
    staging = tmp_path / ".best.publishing"
    staging.mkdir()
    (staging / "half-copied").write_text("x")
    assert publish_model(folder, destination) == destination
    assert sorted(p.name for p in destination.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert not staging.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert CIRModel.load(destination).query_mode == "combiner"


class _TouchOnLoad:
    """Unpickling this calls ``Path.touch``: what loading weights must never do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (self.path,)


def test_weights_files_that_would_run_code_are_refused(saved, tmp_path):
    """Weights load with ``weights_only``: a pickle that calls a function is a corrupt file, and the call never happens."""
    _, folder = saved
    meta = json.loads((folder / "model.json").read_text())
    older = _copy(folder, tmp_path / "older")
    (older / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if not k.endswith("sha1")}))
    for name, error in [("weights.pt", "corrupt weights file"), ("matcher.pt", "missing or corrupt matcher weights")]:
        state = torch.load(folder / name, weights_only=True)
        torch.save({**state, "payload": _TouchOnLoad(tmp_path / "ran")}, older / name)
        with pytest.raises(ModelError) as info:
            CIRModel.load(older)
        assert _message(info) == f"{error} {older / name}: " + REFUSED
        assert not (tmp_path / "ran").exists()
        (older / name).write_bytes((folder / name).read_bytes())


def test_a_refused_open_clip_checkpoint_is_one_line(tmp_path):
    """Issue 22 item 10: a refused pickle in an open_clip checkpoint printed torch's paragraphs and
    then the advice for downloading weights, which does not apply to a local file."""
    from support.pickles import crafted_checkpoint

    checkpoint = crafted_checkpoint(tmp_path / "vit-s-32.pt", tmp_path / "ran")
    with pytest.raises(ModelError) as info:
        create_backbone(f"openclip:ViT-S-32:{checkpoint}")
    assert _message(info) == f"cannot load checkpoint file {checkpoint} into ViT-S-32: " + REFUSED
    assert not (tmp_path / "ran").exists()


# -- a crash while saving (issue 12) --
def combiner_model(seed: int) -> CIRModel:
    torch.manual_seed(seed)
    backbone = create_backbone("tiny")
    return CIRModel(backbone, "combiner", Combiner(backbone.feature_dim, 64, 128))


def combiner_state(model: CIRModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("combiner.")}


def test_a_crash_while_saving_a_model_leaves_the_old_or_the_new_pair(tmp_path, monkeypatch):
    """Issue 12 item 11: weights.pt was swapped before model.json, so a crash between left a mismatched pair."""
    old, new = combiner_model(0), combiner_model(1)
    old.save(tmp_path / "m")

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:  # killed before model.json is replaced: the old model, whole
        patch.setattr(cir_module, "write_json", crash)
        with pytest.raises(RuntimeError):
            new.save(tmp_path / "m")
    loaded = CIRModel.load(tmp_path / "m")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in combiner_state(old).items())

    real_replace = Path.replace
    with monkeypatch.context() as patch:  # killed after model.json, before the weights' rename: the new one
        patch.setattr(
            Path, "replace", lambda self, target: crash() if self.name.endswith(".tmp") else real_replace(self, target)
        )
        with pytest.raises(RuntimeError):
            new.save(tmp_path / "m")
    loaded = CIRModel.load(tmp_path / "m")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in combiner_state(new).items())
    assert not (tmp_path / "m" / ".weights.pt.tmp").exists()  # the interrupted rename was completed

    torch.save(combiner_state(old), tmp_path / "m" / "weights.pt")  # a pair mixed up by hand
    with pytest.raises(ModelError, match="does not match .*model.json"):
        CIRModel.load(tmp_path / "m")
