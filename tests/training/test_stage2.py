"""Stage 2 pieces on the synthetic catalog: the static bank, the step with a description matcher
(a tiny random BERT, no download), and what stage 2 (train_stage with a Stage2Config) freezes, skips, caches and reports."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fashion_cir.errors import FashionCIRError
from fashion_cir.features.cache import FeatureCache
from fashion_cir.io import text_sha1
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.combiner import Combiner
from fashion_cir.models.factory import create_backbone
from fashion_cir.models.fusion import Fusion
from fashion_cir.models.matcher import DescriptionMatcher
from fashion_cir.training import Stage2Config, train_stage
from fashion_cir.training.data import epoch_batches
from fashion_cir.training.distributed import DistContext
from fashion_cir.training.losses import BankInfoNCELoss
from fashion_cir.training.stage1 import ItemTables
from fashion_cir.training.stage2 import Stage2Step, StaticBank, build_bank
from support.matcher import tiny_encoder as tiny_encoder_folder
from support.training import load_data, make_dataset, val_evaluator

FAST = dict(batch_size=8, lr=1e-2, progress=False, log_every=1, warmup_ratio=0.0, epochs=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(make_dataset(tmp_path_factory.mktemp("catalog")))


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    """A 1-layer, 16-wide random BERT with MiniLM's tokenizer, saved as an ``hf:`` folder."""
    return tiny_encoder_folder(tmp_path_factory.mktemp("tiny-bert"))


def _model(encoder: str, mode: str = "sum") -> CIRModel:
    torch.manual_seed(0)
    backbone = create_backbone("tiny")
    model = CIRModel(backbone, mode, Combiner(backbone.feature_dim) if mode == "combiner" else None)
    model.matcher = DescriptionMatcher(encoder)
    model.fusion = Fusion(composed=0.6, caption=0.4)
    return model


def test_static_bank_rows_groups_and_nothing_saved(tiny_encoder):
    raw = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    bank = StaticBank(CIRModel(create_backbone("tiny")), ["a", "b", "c", "d"], raw)
    assert bank.index == {"a": 0, "b": 1, "c": 2, "d": 3} and torch.equal(bank.raw, raw)
    assert torch.allclose(bank.items, torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    groups = bank.groups.tolist()
    assert groups[1] == groups[3] and len({groups[0], groups[1], groups[2]}) == 3 and bank.duplicates == 1
    # with a matcher, the items are the normalised image rows joined with the description table's rows
    described = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    joined = StaticBank(_model(tiny_encoder), ["a", "b", "c", "d"], raw, ItemTables(described, None))
    expected = torch.cat([torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), described], dim=1)
    assert torch.allclose(joined.items, expected, atol=1e-6)
    # the bank is rebuilt from the frozen encoder on every start: never written into checkpoints
    assert joined.state_dict() == {} and bank.state_dict() == {}


def test_step_joins_the_matchers_query_features(tiny_encoder):
    model = _model(tiny_encoder).eval()
    raw = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    described = model.matcher.embed(["a red shirt", "a blue dress", "green trousers", "a black coat", "a hat"], "item")
    bank = StaticBank(model, [f"i{n}" for n in range(5)], raw, ItemTables(described, None))
    captions = ["is red", "has long sleeves"]
    batch = {
        "tokens": model.backbone.tokenize(captions),
        "caption_tokens": model.matcher.tokenize(captions),
        "reference_ids": torch.tensor([1, 3]),
        "target_ids": torch.tensor([0, 2]),
    }
    loss, _ = Stage2Step(model, bank, BankInfoNCELoss(0.1))(batch)
    with torch.no_grad():
        text = model.backbone.encode_texts(batch["tokens"])
        image_side = F.normalize(F.normalize(raw[[1, 3]], dim=-1) + F.normalize(text, dim=-1), dim=-1)
        text_side = model.matcher.embed(captions, "query")
        queries = torch.cat([image_side * 0.6, text_side * 0.4], dim=1)  # fused: 0.6 image + 0.4 caption
        items = torch.cat([F.normalize(raw, dim=-1), described], dim=1)
        logits = queries @ items.T / 0.1
        by_hand = (torch.logsumexp(logits, dim=1) - logits[[0, 1], [0, 2]]).mean()
    assert torch.allclose(loss.detach(), by_hand, atol=1e-5)


def test_build_bank_joins_each_items_description(tiny_encoder, data, tmp_path):
    _, paths, _, records = data
    model = _model(tiny_encoder).eval()
    ids = sorted(paths)[:6]
    known = {i: records[i] for i in ids[:4]}  # the last two have no description
    config = Stage2Config(**FAST)
    bank = build_bank(
        model,
        {i: paths[i] for i in ids},
        FeatureCache(tmp_path),
        config,
        DistContext(0, 1, 0, torch.device("cpu")),
        known,
    )
    assert bank.ids == ids
    with torch.no_grad():
        pixels = [model.backbone.preprocess(Image.open(paths[i]).convert("RGB")) for i in ids]
        images = model.backbone.encode_images(torch.stack(pixels))
    assert torch.allclose(bank.raw, images, rtol=2e-3, atol=2e-3)  # the cache stores float16
    text_side = torch.cat([model.matcher.embed([known[i]["description"] for i in ids[:4]], "item"), torch.zeros(2, 16)])
    expected = torch.cat([F.normalize(images, dim=-1), text_side], dim=1)  # the weights are on the query side
    assert torch.allclose(bank.items, expected, rtol=2e-3, atol=2e-3)


def _weights(model: CIRModel, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def _changed(before: dict[str, torch.Tensor], model: CIRModel) -> bool:
    after = model.state_dict()
    return any(not torch.equal(v, after[k]) for k, v in before.items())


def test_train_stage2_freezes_skips_caches_and_reports(tiny_encoder, data, tmp_path):
    triplets, paths, val_sets, records = data
    dropped = triplets[0].target
    catalog = {i: p for i, p in paths.items() if i != dropped}
    usable = [t for t in triplets if dropped not in (t.candidate, t.target)]
    records = {**records, **{i: {"description": f"a photo of val item {i}"} for i in val_sets["val"].image_paths}}
    model = _model(tiny_encoder, "combiner")
    last = f"backbone.clip.transformer.resblocks.{len(model.backbone.clip.transformer.resblocks) - 1}."
    before = {
        part: _weights(model, prefix)
        for part, prefix in [
            ("first block", "backbone.clip.transformer.resblocks.0."),
            ("last block", last),
            ("image", "backbone.clip.visual."),
            ("combiner", "combiner."),
            ("matcher", "matcher.query_encoder."),
        ]
    }
    config = Stage2Config(encoders="text", last_n_blocks=1, train_combiner=False, train_matcher=True, **FAST)
    trained = train_stage(
        config, model, triplets, catalog, val_evaluator(val_sets, records, tmp_path / "cache"), records, tmp_path
    )
    changed = {part: _changed(weights, trained) for part, weights in before.items()}
    assert changed == {"first block": False, "last block": True, "image": False, "combiner": False, "matcher": True}

    summary = json.loads((tmp_path / "summary.json").read_text())
    annotated = sum(t.extra.get("source") != "generated" for t in usable)
    assert {
        k: summary[k]
        for k in (
            "annotated_triplets",
            "generated_triplets",
            "skipped_triplets",
            "bank_size",
            "bank_duplicate_rows",
            "negatives_per_query",
            "query_mode",
            "text_template",
        )
    } == {
        "annotated_triplets": annotated,
        "generated_triplets": len(usable) - annotated,
        "skipped_triplets": len(triplets) - len(usable),
        "bank_size": 15,
        "bank_duplicate_rows": 0,
        "negatives_per_query": 14,
        "query_mode": "combiner",
        "text_template": model.text_template,
    }
    assert len(triplets) > len(usable) > annotated > 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in logged} == {"stage2"}
    validated = [r for r in logged if "val" in r]  # {protocol: {set: metrics, "average": ...}}
    assert validated and all("R@10" in r["val"]["split"]["val"] for r in validated)  # the val set was evaluated
    # the frozen image encoder's features are cached under <out>/cache and reused: train and val images
    cache = FeatureCache(tmp_path / "cache")
    cache.encode(trained.backbone, {**catalog, **val_sets["val"].image_paths}, progress=False)
    assert cache.last_stats.computed == 0 and cache.last_stats.reused == len(catalog) + len(val_sets["val"].image_paths)
    # and so are the description features of the bank's items and of the val catalog
    (stored,) = (tmp_path / "cache").glob("descriptions-*.npz")
    with np.load(stored) as saved:
        keys = set(saved["keys"].tolist())
    assert {text_sha1(records[i]["description"]) for i in [*catalog, *val_sets["val"].image_paths]} <= keys


def test_train_stage2_trains_only_the_combiner_when_the_encoders_are_frozen(tiny_encoder, data, tmp_path):
    triplets, paths, _, records = data
    model = _model(tiny_encoder, "combiner")
    before = {
        part: _weights(model, prefix)
        for part, prefix in [
            ("text", "backbone.clip.transformer."),
            ("combiner", "combiner."),
            ("matcher", "matcher.query_encoder."),
        ]
    }
    config = Stage2Config(encoders="none", train_combiner=True, train_matcher=False, **FAST)
    trained = train_stage(config, model, triplets, paths, None, records, tmp_path)
    changed = {part: _changed(w, trained) for part, w in before.items()}
    assert changed == {"text": False, "combiner": True, "matcher": False}


def test_train_stage2_needs_a_bank_and_one_batch(data, tmp_path):
    triplets, paths, _, records = data
    model = CIRModel(create_backbone("tiny"), "sum")
    with pytest.raises(FashionCIRError, match=r"^stage2: no catalog image could be encoded for the bank$"):
        train_stage(Stage2Config(**FAST), model, triplets, {}, None, records, tmp_path / "empty")
    annotated = [t for t in triplets if t.extra.get("source") != "generated"][:8]
    with pytest.raises(FashionCIRError, match=r"^stage2: 7 usable training triplets, fewer than one batch of 8$"):
        train_stage(Stage2Config(**FAST), model, annotated[:7], paths, None, records, tmp_path / "seven")
    train_stage(Stage2Config(**FAST), model, annotated, paths, None, records, tmp_path / "eight")  # one step
    assert json.loads((tmp_path / "eight" / "summary.json").read_text())["global_step"] == 1


def _joined_by_hand(captions: list[str], rng: random.Random) -> str:
    """CLIP4Cir's training joining as documented (data/captions.py, training/data.py): one draw of
    ``random.Random(f"{seed}/{epoch}/{position}")`` picks "c1 and c2", "c2 and c1", "c1" or "c2"."""
    first, second = (c.strip(".?, ") for c in captions)
    choice = rng.random()
    text = (
        f"{first} and {second}"
        if choice < 0.25
        else f"{second} and {first}"
        if choice < 0.5
        else first
        if choice < 0.75
        else second
    )
    return text[:1].upper() + text[1:]


def test_train_stage2_queries_carry_the_reference_description_and_the_seeded_caption_join(data, tmp_path, monkeypatch):
    """The texts the text encoder is trained on: every annotated triplet's query is its reference's
    description + ", but " + its two captions joined by the configured seed's draw for its epoch and
    position in the epoch (rebuilt here by hand, not through the training code)."""
    triplets, paths, _, _ = data
    annotated = [t for t in triplets if t.extra.get("source") != "generated"][:8]
    assert all(t.reference_prompt is None and len(t.captions) == 2 for t in annotated)
    records = {i: {"description": f"a zq{i} garment"} for i in paths}  # one marker word per image
    model = CIRModel(create_backbone("tiny"), "sum")
    assert model.text_template == "prompt"
    seen: list[list[str]] = []
    tokenize = model.backbone.tokenize
    monkeypatch.setattr(model.backbone, "tokenize", lambda texts: seen.append(list(texts)) or tokenize(texts))
    config = Stage2Config(**{**FAST, "seed": 3})
    train_stage(config, model, annotated, paths, None, records, tmp_path)  # one step: the 8 triplets, shuffled

    (texts,) = seen
    (batch,) = epoch_batches(8, 0, 8, None, 3, 0)  # position in the epoch -> triplet (the order is tested elsewhere)
    queried = [annotated[n] for n in batch]
    # (1) every query holds its own reference's description (the only marker word in it)
    assert [re.findall(r"zq\w+", text) for text in texts] == [[f"zq{t.candidate}"] for t in queried]

    def expected(seed) -> list[str]:
        out = []
        for position, triplet in enumerate(queried):
            caption = _joined_by_hand(list(triplet.captions), random.Random(f"{seed}/0/{position}"))
            out.append(f"a zq{triplet.candidate} garment, but {caption[:1].lower() + caption[1:]}")
        return out

    assert texts == expected(3)  # (2) the caption join follows the configured seed
    assert expected(None) != expected(3)  # a join seeded "None/epoch/position" reads differently
