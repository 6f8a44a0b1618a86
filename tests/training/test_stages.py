"""Two-stage training on a tiny synthetic catalog (tiny random CLIP, CPU): batches, loss goes down,
static bank negatives, saved models load, exact resume, config checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fashion_cir.errors import FashionCIRError
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.combiner import Combiner
from fashion_cir.models.factory import create_backbone
from fashion_cir.training import Stage1Config, Stage2Config, TrainingStopped, train_stage
from fashion_cir.training.data import epoch_batches, rank_micro_batches
from fashion_cir.training.distributed import DistContext
from fashion_cir.training.losses import BankInfoNCELoss
from fashion_cir.training.stage2 import Stage2Step, StaticBank
from support.training import final_state, load_data, losses, make_dataset, val_evaluator


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(make_dataset(tmp_path_factory.mktemp("catalog")))


FAST = dict(batch_size=8, lr=1e-3, progress=False, log_every=1, warmup_ratio=0.1)


def test_epoch_batches_mix_annotated_and_generated():
    batches = epoch_batches(5, 20, 8, 0.25, seed=3, epoch=0)
    assert len(batches) == 4  # 20 generated / 6 per batch -> 4 batches; annotated (2 per batch) oversampled
    assert all(sum(i < 5 for i in b) == 2 and len(b) == 8 for b in batches)
    assert {i for b in batches for i in b if i >= 5} == set(range(5, 25))
    assert batches == epoch_batches(5, 20, 8, 0.25, seed=3, epoch=0) != epoch_batches(5, 20, 8, 0.25, seed=3, epoch=1)
    plain = epoch_batches(5, 20, 8, None, seed=3, epoch=0)
    assert len(plain) == 3 and len({i for b in plain for i in b}) == 24  # last partial batch dropped


def test_rank_micro_batches_partition_the_global_batch():
    batches = [list(range(8)), list(range(8, 16))]
    plans = [rank_micro_batches(batches, 1, 0, 2, DistContext(r, 2, r, torch.device("cpu"))) for r in range(2)]
    assert [len(p) for p in plans] == [2, 2]  # step 1 only (resume position), 2 micro-batches each
    assert sorted(index for plan in plans for micro in plan for _, _, index in micro) == list(range(8, 16))
    assert plans[0][0] == [(0, 8, 8), (0, 9, 9)]  # (epoch, position in epoch, example)


def test_stage1_text_only_lowers_loss_and_saves_loadable_model(data, tmp_path):
    triplets, paths, val_sets, records = data
    model = CIRModel(create_backbone("tiny"), "sum_raw")
    image_before = {k: v.clone() for k, v in model.backbone.state_dict().items() if k.startswith("clip.visual.")}
    config = Stage1Config(encoders="text", epochs=3, **FAST)
    trained = train_stage(
        config, model, triplets, paths, val_evaluator(val_sets, records, tmp_path / "cache"), records, tmp_path
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["image_features"] == "feature cache" and summary["annotated_triplets"] == 12
    steps = summary["global_step"] // 3
    curve = losses(tmp_path)
    assert np.mean(curve[-steps:]) < np.mean(curve[:steps]) - 0.1
    assert all(torch.equal(trained.backbone.state_dict()[k].cpu(), v.cpu()) for k, v in image_before.items())
    loaded = CIRModel.load(tmp_path / "model")
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.cpu()), name
    assert (tmp_path / "best" / "model.json").is_file() and json.loads((tmp_path / "config.json").read_text())[
        "encoders"
    ] == "text"
    validated = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "val" in r]
    assert len(validated) == 4  # before training and after each of the 3 epochs, {protocol: {set: metrics}}
    assert all(set(r["val"]) == {"split"} and r["val"]["split"]["val"]["n_queries"] == 6 for r in validated)
    best = json.loads((tmp_path / "best" / "model.json").read_text())
    assert best["selection"]["metric"] == "overall"  # the evaluator's selection rule, and its figure
    assert best["selection"]["value"] == max(r["selection_metric"] for r in validated if not r.get("before_training"))


def test_stage2_trains_against_the_whole_bank(data, tmp_path):
    triplets, paths, val_sets, records = data
    model = CIRModel(create_backbone("tiny"), "sum_raw")
    image_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.clip.visual.")}
    config = Stage2Config(epochs=3, temperature=0.05, **FAST)
    trained = train_stage(
        config, model, triplets, paths, val_evaluator(val_sets, records, tmp_path / "cache"), records, tmp_path
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bank_size"] == 16 and summary["negatives_per_query"] == 15
    steps = summary["global_step"] // 3
    curve = losses(tmp_path)
    assert np.mean(curve[-steps:]) < np.mean(curve[:steps]) - 0.1
    loaded = CIRModel.load(tmp_path / "model")
    assert all(torch.equal(loaded.state_dict()[k], v.cpu()) for k, v in image_before.items())
    text_key = "backbone.clip.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(loaded.state_dict()[text_key], trained.state_dict()[text_key].cpu())


def test_stage2_weights_in_the_triplets_hard_negatives(data, tmp_path):
    """The triplets' hard negatives reach the bank loss: weighting them up raises the first step's
    loss (same model, same batch), and without hard negatives the weight changes nothing."""
    triplets, paths, val_sets, records = data

    def first_loss(name: str, **settings) -> float:
        config = Stage2Config(epochs=1, stop_after_steps=1, **FAST, **settings)
        torch.manual_seed(0)
        with pytest.raises(TrainingStopped):
            train_stage(
                config, CIRModel(create_backbone("tiny"), "sum"), triplets, paths, None, records, tmp_path / name
            )
        return losses(tmp_path / name)[0]

    plain = first_loss("plain")
    assert first_loss("unused-weight", hard_negative_weight=20.0) == plain
    assert first_loss("weighted", hard_negatives_per_query=3, hard_negative_weight=20.0) > plain + 0.05


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True)


def test_stage2_step_is_infonce_on_the_target_row_with_its_duplicates_left_out():
    """One stage-2 step against a bank with duplicate rows, recomputed by hand: the positive is the
    target's row (not the reference's), and the copies of the target drop out of its softmax."""
    model = CIRModel(create_backbone("tiny"), "sum").eval()
    raw = torch.randn(7, 32, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 3.0, 7)[:, None]
    raw[4], raw[5] = raw[1], raw[3]  # row 4 copies target 1, row 5 copies target 3
    bank = StaticBank(model, [f"img{n}" for n in range(7)], raw)
    assert bank.duplicates == 2
    texts = ["is red with long sleeves", "has a v-neck"]
    batch = {
        "tokens": model.backbone.tokenize(texts),
        "reference_ids": torch.tensor([0, 2]),
        "target_ids": torch.tensor([1, 3]),
    }
    temperature = 0.1
    loss, reported = Stage2Step(model, bank, BankInfoNCELoss(temperature))(batch)
    with torch.no_grad():
        text = model.backbone.encode_texts(batch["tokens"])
        logits = _unit(_unit(raw[[0, 2]]) + _unit(text)) @ _unit(raw).T / temperature
        by_hand = []
        for row, (target, copy) in enumerate([(1, 4), (3, 5)]):
            kept = [j for j in range(7) if j != copy]
            by_hand.append(torch.logsumexp(logits[row, kept], 0) - logits[row, target])
    assert torch.allclose(loss.detach(), torch.stack(by_hand).mean(), atol=1e-5), (loss, by_hand)
    assert torch.equal(reported, loss.detach())


def combiner_model() -> CIRModel:
    torch.manual_seed(0)
    backbone = create_backbone("tiny")
    return CIRModel(backbone, "combiner", Combiner(backbone.feature_dim))


def test_stage2_resume_after_stop_is_exact(data, tmp_path):
    """Combiner (dropout: RNG state matters) + text encoder, gradient accumulation, stop after step 3
    (last checkpoint at step 2), resume in a fresh model: identical final weights."""
    triplets, paths, val_sets, records = data
    config = Stage2Config(epochs=2, grad_accum_steps=2, checkpoint_every=2, **{**FAST, "batch_size": 16})

    def evaluator(out):
        return val_evaluator(val_sets, records, out / "cache")

    train_stage(config, combiner_model(), triplets, paths, evaluator(tmp_path / "full"), records, tmp_path / "full")
    stopped = config.model_copy(update={"stop_after_steps": 3})
    with pytest.raises(TrainingStopped):
        train_stage(
            stopped, combiner_model(), triplets, paths, evaluator(tmp_path / "resumed"), records, tmp_path / "resumed"
        )
    train_stage(
        config, combiner_model(), triplets, paths, evaluator(tmp_path / "resumed"), records, tmp_path / "resumed"
    )
    full, resumed = final_state(tmp_path / "full" / "model"), final_state(tmp_path / "resumed" / "model")
    assert full.keys() == resumed.keys() and any(k.startswith("combiner.") for k in full)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["global_step"] == 4


def test_resume_refuses_a_changed_config(data, tmp_path):
    triplets, paths, val_sets, records = data
    config = Stage2Config(epochs=1, **{**FAST, "batch_size": 16})
    train_stage(config, CIRModel(create_backbone("tiny"), "sum"), triplets, paths, None, records, tmp_path)
    with pytest.raises(FashionCIRError, match="another config.*lr"):
        train_stage(
            config.model_copy(update={"lr": 0.5}),
            CIRModel(create_backbone("tiny"), "sum"),
            triplets,
            paths,
            None,
            records,
            tmp_path,
        )


def test_stage1_with_pixels_leaves_out_unreadable_images(tmp_path):
    """An image that does not decode is found before training starts: its triplets are skipped and
    counted, instead of the loader failing at the same step on every resume."""
    paths = make_dataset(tmp_path / "catalog")
    triplets, image_paths, val_sets, records = load_data(paths)
    broken = triplets[0].candidate
    Path(image_paths[broken]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    model = CIRModel(create_backbone("tiny"), "sum_raw")
    train_stage(
        Stage1Config(encoders="image", epochs=1, **FAST),
        model,
        triplets,
        image_paths,
        val_evaluator(val_sets, records, tmp_path / "out" / "cache"),
        records,
        tmp_path / "out",
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    referencing = sum(broken in (t.candidate, t.target) for t in triplets)
    assert summary["unreadable_images"] == 1 and summary["skipped_triplets"] == referencing > 0
