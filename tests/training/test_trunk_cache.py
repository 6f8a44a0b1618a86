"""Stage 1 training the image side on CPU from the trunk cache (``offline+blocks1``): the cached
token maps stand in for pixels, only the blocks after the cache train, and the saved model carries
them, so stage 2's bank and every later consumer see the trained image side."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fashion_cir.features.cache import FeatureCache
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.factory import create_backbone
from fashion_cir.training import Stage1Config, Stage2Config, train_stage
from fashion_cir.training.distributed import DistContext
from fashion_cir.training.stage2 import build_bank
from support.training import load_data, losses, make_dataset, val_evaluator

FAST = dict(batch_size=8, lr=1e-3, progress=False, log_every=1, warmup_ratio=0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trunk")
    triplets, paths, val_sets, records = load_data(make_dataset(root / "catalog"))
    model = CIRModel(create_backbone("offline+blocks1"), "sum_raw")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = root / "features"
    config = Stage1Config(encoders="image", epochs=3, cache_dir=str(cache), **FAST)
    out = train_stage(config, model, triplets, paths, val_evaluator(val_sets, records, cache), records, root / "stage1")
    return out, before, root, (triplets, paths, val_sets, records)


def test_only_the_blocks_after_the_cache_train(trained):
    model, before, root, _ = trained
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k].cpu())}
    assert any(k.startswith("backbone.image_tower._blocks.15.") for k in changed)
    assert any(k.startswith("backbone.image_tower._conv_head.") for k in changed)
    assert any(k.startswith("backbone.image_proj.") for k in changed)
    assert not any(
        k.startswith(
            (
                "backbone.image_tower._blocks.14.",
                "backbone.image_tower._conv_stem.",
                "backbone.text_tower.",
                "backbone.text_proj.",
            )
        )
        for k in changed
    )
    # batch norm keeps its ImageNet statistics while the blocks train
    assert not any("running_" in k for k in changed)
    summary = json.loads((root / "stage1" / "summary.json").read_text())
    assert summary["image_features"] == "feature cache (trunk; head trained)"
    curve = losses(root / "stage1")
    steps = summary["global_step"] // 3
    assert np.mean(curve[-steps:]) < np.mean(curve[:steps]) - 0.1


def test_training_reads_token_maps_from_the_cache_not_pixels(trained, monkeypatch):
    """A second run over the same images finds every token map in the cache: the trunk is never
    run again (a trunk call fails the test), yet the head trains."""
    model, _, root, (triplets, paths, val_sets, records) = trained
    fresh = CIRModel(create_backbone("offline+blocks1"), "sum_raw")
    folder = FeatureCache(root / "features").folder(fresh.backbone)
    shard = next(folder.glob("part-*.npz"))
    with np.load(shard) as stored:
        assert stored["features"].shape[1] == 192 * 7 * 7 and stored["features"].dtype == np.float16

    def no_trunk(*args, **kwargs):
        raise AssertionError("the image trunk ran during training; the cache should have answered")

    monkeypatch.setattr(fresh.backbone, "encode_image_trunk", no_trunk)
    monkeypatch.setattr(fresh.backbone, "trunk_engine", lambda: no_trunk)  # what the feature cache runs (ONNX or torch)
    config = Stage1Config(encoders="image", epochs=1, cache_dir=str(root / "features"), **FAST)
    out = train_stage(
        config, fresh, triplets, paths, val_evaluator(val_sets, records, root / "features"), records, root / "again"
    )
    block = "backbone.image_tower._blocks.15._project_conv.weight"
    assert not torch.equal(out.state_dict()[block], CIRModel(create_backbone("offline+blocks1")).state_dict()[block])


def test_the_saved_model_carries_the_trained_blocks(trained):
    model, _, root, (_, paths, _, _) = trained
    loaded = CIRModel.load(root / "stage1" / "model")
    assert loaded.backbone.spec == "offline+blocks1"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.cpu()), name
    images = dict(list(paths.items())[:6])
    cache = FeatureCache(root / "features")
    _, ours = cache.encode(model.backbone.eval(), images, progress=False)
    _, theirs = cache.encode(loaded.backbone, images, progress=False)
    np.testing.assert_array_equal(ours, theirs)
    _, untrained = cache.encode(create_backbone("offline+blocks1"), images, progress=False)
    assert np.abs(ours - untrained).max() > 1e-3  # the trained head changes what every consumer sees


def test_stage2_builds_its_bank_from_the_stage1_image_side(trained):
    model, _, root, (_, paths, _, records) = trained
    stage1 = CIRModel.load(root / "stage1" / "model")
    cache = FeatureCache(root / "features")
    config = Stage2Config(epochs=1, encoders="text", cache_dir=str(root / "features"), **FAST)
    bank = build_bank(stage1, paths, cache, config, DistContext(0, 1, 0, torch.device("cpu")), records)
    _, expected = cache.encode(model.backbone.eval(), {i: paths[i] for i in bank.ids}, progress=False)
    _, untrained = cache.encode(create_backbone("offline+blocks1"), {i: paths[i] for i in bank.ids}, progress=False)
    assert bank.ids == list(paths)
    np.testing.assert_allclose(bank.raw.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(bank.raw.numpy() - untrained).max() > 1e-3


def test_a_tiny_clip_trains_its_last_vision_block_from_cached_tokens(tmp_path, monkeypatch):
    """The same path for open_clip towers (``tiny+blocks1``, the tiny ViT): cached token sequences
    stand in for pixels (the trunk never runs while training), only the last block + ln_post + proj
    of the vision side train, and the saved folder rebuilds the trained model."""
    triplets, paths, val_sets, records = load_data(make_dataset(tmp_path / "catalog"))
    model = CIRModel(create_backbone("tiny+blocks1"), "sum_raw")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = FeatureCache(tmp_path / "features")
    cache.encode(model.backbone, {**paths, **val_sets["val"].image_paths}, progress=False)  # fill the trunk cache first

    def no_trunk(*args, **kwargs):
        raise AssertionError("the image trunk ran during training")

    monkeypatch.setattr(model.backbone, "encode_image_trunk", no_trunk)
    monkeypatch.setattr(model.backbone, "trunk_engine", lambda: no_trunk)
    config = Stage1Config(encoders="both", epochs=2, cache_dir=str(tmp_path / "features"), **FAST)
    trained = train_stage(
        config,
        model,
        triplets,
        paths,
        val_evaluator(val_sets, records, tmp_path / "features"),
        records,
        tmp_path / "stage1",
    )
    monkeypatch.undo()
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(before[k], v)}
    visual = {k for k in changed if k.startswith("backbone.clip.visual.")}
    assert visual and all(
        k.startswith(
            (
                "backbone.clip.visual.transformer.resblocks.1.",
                "backbone.clip.visual.ln_post.",
                "backbone.clip.visual.proj",
            )
        )
        for k in visual
    )
    assert any(k.startswith("backbone.clip.transformer.") for k in changed)  # the text side trains too ("both")
    assert (
        json.loads((tmp_path / "stage1" / "summary.json").read_text())["image_features"]
        == "feature cache (trunk; head trained)"
    )
    loaded = CIRModel.load(tmp_path / "stage1" / "model")
    assert loaded.backbone.spec == "tiny+blocks1:0"
    _, ours = cache.encode(trained.backbone.eval(), paths, progress=False)
    _, theirs = cache.encode(loaded.backbone, paths, progress=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
